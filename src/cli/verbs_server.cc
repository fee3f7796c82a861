// server, service, auth and test-connection: the replica-server side
// (Get-/Set-VMReplicationServer, *-VMReplicationAuthorizationEntry,
// Test-VMReplicationConnection).
#include "cli/format.h"
#include "cli/parse.h"
#include "cli/verbs.h"

namespace vmreplica::cli {
namespace {

// Answers other than 0 of a read that the command needs: let the shared
// handling report them (or wait, should the daemon ever start a job).
bool Failed(const v1::MethodResult& result) { return result.return_value() != Number(ReturnCode::kCompleted); }

void AddSettingsRows(PropertyTable& t, const v1::ServerSettings& s) {
  t.Add("RecoveryServerEnabled", std::string(BoolText(s.recovery_server_enabled())))
      .Add("AllowedAuthenticationType", NumberAndName<AllowedAuthenticationType>(s.allowed_authentication_type()))
      .Add("CertificateThumbPrint", s.certificate_thumbprint())
      .Add("HttpPort", std::to_string(s.http_port()))
      .Add("HttpsPort", std::to_string(s.https_port()))
      .Add("MonitoringInterval",
           std::to_string(s.monitoring_interval()) + " (" + FormatTimeSpan(s.monitoring_interval()) + ")")
      .Add("MonitoringStartTime", FormatHhMm(s.monitoring_start_time_min()));
}

void AddStatusRows(PropertyTable& t, const v1::ServiceStatusResponse& r) {
  t.Add("Version", r.version())
      .Add("HostName", r.host_name())
      .Add("ListenerRunning", std::string(BoolText(r.listener_running())))
      .Add("ListenAddress", r.listen_address())
      .Add("ProtocolVersion", std::to_string(r.protocol_version()))
      .Add("Features", Join({r.features().begin(), r.features().end()}));
}

int ShowStatus(Session& s) {
  v1::ServiceStatusResponse status;
  if (int rc = s.Call(VMR_RPC(GetServiceStatus), v1::Empty(), &status); rc != kExitOk) return rc;
  if (s.json()) s.PrintJson(status);
  if (Failed(status.result())) return s.HandleResult("GetServiceStatus", status.result(), nullptr);
  if (!s.json()) {
    PropertyTable t;
    AddStatusRows(t, status);
    s.out() << t.Render();
  }
  return kExitOk;
}

// ---------------------------------------------------------------- server

struct ServerSetOptions {
  bool enable = false, disable = false;
  std::string auth, thumbprint, monitoring_start;
  uint32_t https_port = 0, http_port = 0, monitoring_interval = 0;
  std::vector<CLI::Option*> changes;
  CLI::Option *o_auth, *o_thumbprint, *o_https, *o_http, *o_interval, *o_start;
};

int ServerSet(Session& s, const ServerSetOptions& o) {
  const bool any = std::any_of(o.changes.begin(), o.changes.end(), [](CLI::Option* c) { return c->count() > 0; });
  if (!any) {
    return s.Error("server set: nothing to change (see vmreplica server set --help)", kExitUsage);
  }
  v1::ServiceSettingsResponse current;
  if (int rc = s.Call(VMR_RPC(GetServiceSettings), v1::Empty(), &current); rc != kExitOk) return rc;
  if (Failed(current.result())) return s.HandleResult("GetServiceSettings", current.result(), nullptr);

  v1::ServiceSettingsRequest request;
  v1::ServerSettings* settings = request.mutable_settings();
  *settings = current.settings();
  if (o.enable) settings->set_recovery_server_enabled(true);
  if (o.disable) settings->set_recovery_server_enabled(false);
  if (o.o_auth->count() > 0) settings->set_allowed_authentication_type(Number(*ParseServerAuth(o.auth)));
  if (o.o_thumbprint->count() > 0) settings->set_certificate_thumbprint(NormalizeThumbprint(o.thumbprint));
  if (o.o_https->count() > 0) settings->set_https_port(o.https_port);
  if (o.o_http->count() > 0) settings->set_http_port(o.http_port);
  if (o.o_interval->count() > 0) settings->set_monitoring_interval(o.monitoring_interval);
  if (o.o_start->count() > 0) settings->set_monitoring_start_time_min(*ParseHhMm(o.monitoring_start));
  return s.Invoke(VMR_RPC(ModifyServiceSettings), request);
}

void AddServer(Registry& reg) {
  reg.Group("server", "replica-server settings (Get-/Set-VMReplicationServer)");
  reg.Add("server get", "show the replica-server settings and the daemon's status",
          {"GetServiceSettings", "GetServiceStatus"}, [](Session& s) {
            v1::ServiceSettingsResponse settings;
            if (int rc = s.Call(VMR_RPC(GetServiceSettings), v1::Empty(), &settings); rc != kExitOk) return rc;
            if (s.json()) s.PrintJson(settings);
            if (Failed(settings.result())) return s.HandleResult("GetServiceSettings", settings.result(), nullptr);
            v1::ServiceStatusResponse status;
            if (int rc = s.Call(VMR_RPC(GetServiceStatus), v1::Empty(), &status); rc != kExitOk) return rc;
            if (s.json()) s.PrintJson(status);
            if (Failed(status.result())) return s.HandleResult("GetServiceStatus", status.result(), nullptr);
            if (!s.json()) {
              PropertyTable t;
              AddSettingsRows(t, settings.settings());
              AddStatusRows(t, status);
              s.out() << t.Render();
            }
            return kExitOk;
          });

  auto o = std::make_shared<ServerSetOptions>();
  CLI::App* set =
      reg.Add("server set", "change replica-server settings; unnamed settings keep their value",
              {"GetServiceSettings", "ModifyServiceSettings"}, [o](Session& s) { return ServerSet(s, *o); });
  auto* en = set->add_flag("--enable", o->enable, "RecoveryServerEnabled = True (accept replication)");
  auto* dis = set->add_flag("--disable", o->disable, "RecoveryServerEnabled = False")->excludes(en);
  o->o_auth = set->add_option("--auth", o->auth, "AllowedAuthenticationType: none|kerberos|certificate|both or 0..3")
                  ->check(StatusValidator([](const std::string& t) { return ParseServerAuth(t).status(); },
                                          "none|kerberos|certificate|both"));
  o->o_thumbprint = set->add_option("--thumbprint", o->thumbprint, "CertificateThumbPrint (informational)");
  o->o_https = set->add_option("--https-port", o->https_port, "HttpsPort: the mTLS replication listener")
                   ->check(CLI::Range(1, 65535));
  o->o_http =
      set->add_option("--http-port", o->http_port, "HttpPort (Kerberos; reported only)")->check(CLI::Range(1, 65535));
  o->o_interval =
      set->add_option("--monitoring-interval", o->monitoring_interval, "MonitoringInterval in seconds (3600..604800)");
  o->o_start = set->add_option("--monitoring-start", o->monitoring_start, "MonitoringStartTime, HH:MM local time")
                   ->check(StatusValidator([](const std::string& t) { return ParseHhMm(t).status(); }, "HH:MM"));
  o->changes = {en, dis, o->o_auth, o->o_thumbprint, o->o_https, o->o_http, o->o_interval, o->o_start};
}

// ---------------------------------------------------------------- service

void AddService(Registry& reg) {
  reg.Group("service", "the replica listener of vmreplicad");
  reg.Add("service start", "start the replica listener (StartService)", {"StartService"},
          [](Session& s) { return s.Invoke(VMR_RPC(StartService), v1::Empty()); });
  reg.Add("service stop", "stop the replica listener (StopService)", {"StopService"},
          [](Session& s) { return s.Invoke(VMR_RPC(StopService), v1::Empty()); });
  reg.Add("service status", "version, host name and listener state (GetServiceStatus)", {"GetServiceStatus"},
          ShowStatus);
  auto state = std::make_shared<uint32_t>(0);
  CLI::App* rsc = reg.Add("service request-state", "RequestStateChange: 2 = enabled (listener on), 3 = disabled",
                          {"RequestStateChange"}, [state](Session& s) {
                            v1::ServiceStateRequest request;
                            request.set_requested_state(*state);
                            return s.Invoke(VMR_RPC(RequestStateChange), request);
                          });
  rsc->add_option("STATE", *state, "2 (Enabled) or 3 (Disabled)")->required()->check(CLI::IsMember({2, 3}));
}

// ---------------------------------------------------------------- auth

struct AuthOptions {
  std::string vm, pattern, storage, trust_group;
  CLI::Option* o_storage = nullptr;
  CLI::Option* o_trust_group = nullptr;
};

void AddEntryOptions(CLI::App* app, AuthOptions* o, bool storage_required) {
  o->o_storage = app->add_option("--storage", o->storage, "ReplicaStorageLocation: where the replicas are kept");
  if (storage_required) o->o_storage->required();
  o->o_trust_group = app->add_option("--trust-group", o->trust_group, "TrustGroup (default: none)");
}

v1::AuthorizationEntry MakeEntry(const AuthOptions& o) {
  v1::AuthorizationEntry e;
  e.set_allowed_primary_host_system(o.pattern);
  e.set_replica_storage_location(o.storage);
  e.set_trust_group(o.trust_group);
  return e;
}

int AuthSet(Session& s, const AuthOptions& o) {
  if (o.o_storage->count() == 0 && o.o_trust_group->count() == 0) {
    return s.Error("auth set: nothing to change (give --storage and/or --trust-group)", kExitUsage);
  }
  // Modify replaces the whole entry: keep what the operator did not name.
  v1::AuthorizationEntriesResponse current;
  if (int rc = s.Call(VMR_RPC(ListAuthorizationEntries), v1::Empty(), &current); rc != kExitOk) return rc;
  if (Failed(current.result())) return s.HandleResult("ListAuthorizationEntries", current.result(), nullptr);
  v1::AuthorizationEntryRequest request;
  *request.mutable_entry() = MakeEntry(o);
  for (const auto& e : current.entries()) {
    if (e.allowed_primary_host_system() != o.pattern) continue;
    if (o.o_storage->count() == 0) request.mutable_entry()->set_replica_storage_location(e.replica_storage_location());
    if (o.o_trust_group->count() == 0) request.mutable_entry()->set_trust_group(e.trust_group());
  }
  return s.Invoke(VMR_RPC(ModifyAuthorizationEntry), request);
}

void AddAuth(Registry& reg) {
  reg.Group("auth", "which primary servers may replicate here (*-VMReplicationAuthorizationEntry)");
  const std::string pattern_help = "AllowedPrimaryServer: a host name, *.domain or *";

  auto add = std::make_shared<AuthOptions>();
  CLI::App* a = reg.Add("auth add", "allow a primary server (AddAuthorizationEntry)", {"AddAuthorizationEntry"},
                        [add](Session& s) {
                          v1::AuthorizationEntryRequest request;
                          *request.mutable_entry() = MakeEntry(*add);
                          return s.Invoke(VMR_RPC(AddAuthorizationEntry), request);
                        });
  a->add_option("PATTERN", add->pattern, pattern_help)->required();
  AddEntryOptions(a, add.get(), /*storage_required=*/true);

  auto set = std::make_shared<AuthOptions>();
  CLI::App* m =
      reg.Add("auth set", "change an entry (ModifyAuthorizationEntry); unnamed fields keep their value",
              {"ListAuthorizationEntries", "ModifyAuthorizationEntry"}, [set](Session& s) { return AuthSet(s, *set); });
  m->add_option("PATTERN", set->pattern, pattern_help)->required();
  AddEntryOptions(m, set.get(), /*storage_required=*/false);

  auto remove = std::make_shared<std::string>();
  CLI::App* r = reg.Add("auth remove", "remove an entry; replication of the VMs it authorised stops",
                        {"RemoveAuthorizationEntry"}, [remove](Session& s) {
                          v1::RemoveAuthorizationEntryRequest request;
                          request.set_allowed_primary_host_system(*remove);
                          return s.Invoke(VMR_RPC(RemoveAuthorizationEntry), request);
                        });
  r->add_option("PATTERN", *remove, pattern_help)->required();

  reg.Add("auth list", "list the entries (ListAuthorizationEntries)", {"ListAuthorizationEntries"}, [](Session& s) {
    return s.Invoke(VMR_RPC(ListAuthorizationEntries), v1::Empty(), [&s](const v1::AuthorizationEntriesResponse& r) {
      Table t({"AllowedPrimaryServer", "ReplicaStorageLocation", "TrustGroup"});
      for (const auto& e : r.entries()) {
        t.AddRow({e.allowed_primary_host_system(), e.replica_storage_location(), e.trust_group()});
      }
      s.out() << t.Render();
    });
  });

  auto bind = std::make_shared<AuthOptions>();
  CLI::App* b = reg.Add("auth bind", "bind a replica VM to an entry (SetAuthorizationEntry)", {"SetAuthorizationEntry"},
                        [bind](Session& s) {
                          v1::SetAuthorizationEntryRequest request;
                          request.set_vm(bind->vm);
                          *request.mutable_entry() = MakeEntry(*bind);
                          return s.Invoke(VMR_RPC(SetAuthorizationEntry), request);
                        });
  b->add_option("VM", bind->vm, "replica VM name or UUID")->required();
  b->add_option("PATTERN", bind->pattern, pattern_help)->required();
  AddEntryOptions(b, bind.get(), /*storage_required=*/true);
}

// ---------------------------------------------------------------- test-connection

struct TestConnectionOptions {
  std::string host, auth = "certificate", thumbprint;
  uint32_t port = 0;
  bool bypass_proxy = false;
};

void AddTestConnection(Registry& reg) {
  auto o = std::make_shared<TestConnectionOptions>();
  CLI::App* t = reg.Add("test-connection",
                        "check that replication to a replica server can be enabled (TestReplicationConnection)",
                        {"TestReplicationConnection"}, [o](Session& s) {
                          v1::TestReplicationConnectionRequest request;
                          request.set_recovery_connection_point(o->host);
                          request.set_recovery_server_port_number(o->port);
                          request.set_authentication_type(Number(*ParseVmAuth(o->auth)));
                          request.set_certificate_thumbprint(NormalizeThumbprint(o->thumbprint));
                          request.set_bypass_proxy_server(o->bypass_proxy);
                          return s.Invoke(VMR_RPC(TestReplicationConnection), request);
                        });
  t->add_option("HOST", o->host, "replica server (RecoveryConnectionPoint)")->required();
  // The range is the daemon's to check (32773), so every client sees one rule.
  t->add_option("PORT", o->port, "its replication port (1..65535)")->required();
  t->add_option("--auth", o->auth, "certificate (2) or kerberos (1)")
      ->capture_default_str()
      ->check(StatusValidator([](const std::string& v) { return ParseVmAuth(v).status(); }, "certificate|kerberos"));
  t->add_option("--thumbprint", o->thumbprint, "our certificate to use (default: the daemon's own)");
  t->add_flag("--bypass-proxy", o->bypass_proxy, "BypassProxyServer");
}

}  // namespace

void AddServerVerbs(Registry& reg) {
  AddServer(reg);
  AddService(reg);
  AddAuth(reg);
  AddTestConnection(reg);
}

}  // namespace vmreplica::cli
