// The replication verbs, one per *-VMReplication / *-VMFailover cmdlet:
// get, enable, set, start, import, suspend, resume, cancel-initial,
// mark-replica, cancel-resync, failover, stop-failover, complete-failover,
// reverse, failback, change-mode-to-primary, resync, remove, measure,
// reset-statistics, points, set-failover-ip, get-failover-ip.
#include "cli/format.h"
#include "cli/parse.h"
#include "cli/verbs.h"

namespace vmreplica::cli {
namespace {

bool Failed(const v1::MethodResult& result) { return result.return_value() != Number(ReturnCode::kCompleted); }

CLI::Validator TimeValidator() {
  return StatusValidator([](const std::string& t) { return ParseTimeArg(t).status(); }, "TIME");
}

// VM plus, for some verbs, --relationship N.
struct VmArgs {
  std::string vm;
  uint32_t relationship = 0;
  CLI::Option* o_relationship = nullptr;
  std::optional<uint32_t> rel() const { return Given(o_relationship, relationship); }
};

// Adds a verb whose first argument is the VM. `args` is shared with the
// handler `run`, which may also capture options the caller adds later.
CLI::App* AddVmVerb(Registry& reg, const std::string& path, const std::string& description,
                    std::vector<std::string> rpcs, bool relationship, std::shared_ptr<VmArgs> args,
                    std::function<int(Session&, const VmArgs&)> run) {
  CLI::App* app =
      reg.Add(path, description, std::move(rpcs), [args, run = std::move(run)](Session& s) { return run(s, *args); });
  app->add_option("VM", args->vm, "virtual machine name or UUID")->required();
  if (relationship) args->o_relationship = AddRelationshipOption(app, &args->relationship);
  return app;
}

CLI::App* AddVmVerb(Registry& reg, const std::string& path, const std::string& description,
                    std::vector<std::string> rpcs, bool relationship, std::function<int(Session&, const VmArgs&)> run) {
  return AddVmVerb(reg, path, description, std::move(rpcs), relationship, std::make_shared<VmArgs>(), std::move(run));
}

// A method with a plain (VmRequest) and an Ex (VmRelationshipRequest)
// variant: the Ex one when --relationship was given.
template <typename Resp>
int CallVmOrEx(Session& s, const VmArgs& a, const Rpc<v1::VmRequest, Resp>& plain,
               const Rpc<v1::VmRelationshipRequest, Resp>& ex,
               const std::type_identity_t<std::function<void(const Resp&)>>& print = nullptr) {
  if (auto rel = a.rel()) {
    v1::VmRelationshipRequest request;
    request.set_vm(a.vm);
    request.set_relationship_index(*rel);
    return s.Invoke(ex, request, print);
  }
  v1::VmRequest request;
  request.set_vm(a.vm);
  return s.Invoke(plain, request, print);
}

int StateChange(Session& s, const VmArgs& a, RequestedReplicationState state,
                const std::vector<std::string>& seed_disks = {}, bool move_seed_disks = false) {
  v1::StateChangeRequest request;
  request.set_vm(a.vm);
  request.set_requested_state(Number(state));
  for (const auto& d : seed_disks) request.add_seed_disks(d);
  request.set_move_seed_disks(move_seed_disks);
  if (auto rel = a.rel()) {
    request.set_relationship_index(*rel);
    return s.Invoke(VMR_RPC(RequestReplicationStateChangeEx), request);
  }
  return s.Invoke(VMR_RPC(RequestReplicationStateChange), request);
}

int Resynchronize(Session& s, const std::string& vm, uint32_t relationship, const std::string& at) {
  v1::ResynchronizeRequest request;
  request.set_vm(vm);
  request.set_relationship_index(relationship);
  if (!at.empty()) request.set_start_time_unix_s(*ParseTimeArg(at));
  return s.Invoke(VMR_RPC(Resynchronize), request);
}

// ---------------------------------------------------------------- relationships

bool IsVm(const v1::Relationship& r, const std::string& vm) { return r.vm_name() == vm || r.vm_id() == vm; }

// The relationship of `vm` with `index` (any index: the highest) from
// ListReplications; *found stays empty when there is none.
int FindRelationship(Session& s, const std::string& vm, std::optional<uint32_t> index,
                     std::optional<v1::Relationship>* found) {
  v1::ReplicationsResponse list;
  if (int rc = s.Call(VMR_RPC(ListReplications), v1::Empty(), &list); rc != kExitOk) return rc;
  if (Failed(list.result())) return s.HandleResult("ListReplications", list.result(), nullptr);
  for (const auto& r : list.relationships()) {
    if (!IsVm(r, vm) || (index && r.relationship_index() != *index)) continue;
    if (!*found || r.relationship_index() > (*found)->relationship_index()) *found = r;
  }
  return kExitOk;
}

// Certificate authentication without a thumbprint: use the daemon's own
// host certificate, as an Enable-VMReplication user picks theirs.
int FillThumbprint(Session& s, v1::RelationshipSettings* settings) {
  if (settings->authentication_type() != Number(AuthenticationType::kCertificate) ||
      !settings->certificate_thumbprint().empty()) {
    return kExitOk;
  }
  v1::CertificatesResponse certificates;
  if (int rc = s.Call(VMR_RPC(GetSystemCertificates), v1::Empty(), &certificates); rc != kExitOk) return rc;
  if (Failed(certificates.result())) return kExitOk;  // the method itself will say what is missing
  for (const auto& c : certificates.certificates()) {
    if (c.role() == "host") {
      settings->set_certificate_thumbprint(c.thumbprint());
      break;
    }
  }
  return kExitOk;
}

// The options of Enable-/Set-VMReplication, bound to CLI11.
struct SettingsFlags {
  std::string replica_server, auth, thumbprint, window;
  uint32_t port = 0, interval = 0, history = 0, vss = 0;
  std::vector<std::string> disks;
  bool compression = false, no_compression = false, auto_resync = false, no_auto_resync = false;
  bool bypass_proxy = false, no_bypass_proxy = false, kvp = false, no_kvp = false;
  CLI::Option *o_server = nullptr, *o_port = nullptr, *o_auth = nullptr, *o_thumbprint = nullptr, *o_interval = nullptr,
              *o_history = nullptr, *o_vss = nullptr, *o_window = nullptr;

  RelationshipOptions ToOptions() const {
    RelationshipOptions o;
    if (o_server->count() > 0) o.replica_server = replica_server;
    if (o_port->count() > 0) o.replica_port = port;
    if (o_auth->count() > 0) o.auth = auth;
    if (o_thumbprint->count() > 0) o.thumbprint = thumbprint;
    if (o_interval->count() > 0) o.interval_s = interval;
    if (o_history->count() > 0) o.history = history;
    if (o_vss->count() > 0) o.vss_hours = vss;
    if (o_window->count() > 0) o.auto_resync_window = window;
    auto pair = [](bool on, bool off) {
      return on ? std::optional<bool>(true) : off ? std::optional<bool>(false) : std::nullopt;
    };
    o.compression = pair(compression, no_compression);
    o.auto_resync = pair(auto_resync, no_auto_resync);
    o.bypass_proxy = pair(bypass_proxy, no_bypass_proxy);
    o.replicate_host_kvp = pair(kvp, no_kvp);
    o.disks = disks;
    return o;
  }
};

void AddSettingsFlags(CLI::App* app, SettingsFlags* f, bool create) {
  f->o_server = app->add_option("--replica-server", f->replica_server, "RecoveryConnectionPoint: the replica server");
  f->o_port = app->add_option("--replica-port", f->port, "RecoveryServerPortNumber")->check(CLI::Range(1, 65535));
  if (create) {
    f->o_server->required();
    f->o_port->required();
  }
  f->o_auth = app->add_option("--auth", f->auth, "AuthenticationType: certificate (2, default) or kerberos (1)")
                  ->check(StatusValidator([](const std::string& t) { return ParseVmAuth(t).status(); },
                                          "certificate|kerberos"));
  f->o_thumbprint =
      app->add_option("--thumbprint", f->thumbprint, "CertificateThumbPrint (default: the daemon's host certificate)");
  f->o_interval = app->add_option("--interval", f->interval, "ReplicationInterval in seconds: 30, 300 or 900")
                      ->check(CLI::IsMember({30, 300, 900}));
  f->o_history = app->add_option("--history", f->history, "RecoveryHistory: additional hourly recovery points, 0..24")
                     ->check(CLI::Range(0, 24));
  f->o_vss =
      app->add_option("--vss-hours", f->vss, "ApplicationConsistentSnapshotInterval in hours, 0..12 (needs --history)")
          ->check(CLI::Range(0, 12));
  auto* on = app->add_flag("--compression", f->compression, "CompressionEnabled = True (the default)");
  app->add_flag("--no-compression", f->no_compression, "CompressionEnabled = False")->excludes(on);
  app->add_option("--disk", f->disks, "IncludedDisks: a disk to replicate (repeatable; default: all)");
  auto* ar = app->add_flag("--auto-resync", f->auto_resync, "AutoResynchronizeEnabled = True");
  app->add_flag("--no-auto-resync", f->no_auto_resync, "AutoResynchronizeEnabled = False")->excludes(ar);
  f->o_window =
      app->add_option("--auto-resync-window", f->window,
                      "AutoResynchronizeIntervalStart-End, HH:MM-HH:MM local time (default 18:30-06:00)")
          ->check(StatusValidator([](const std::string& t) { return ParseHhMmRange(t).status(); }, "HH:MM-HH:MM"));
  auto* bp = app->add_flag("--bypass-proxy", f->bypass_proxy, "BypassProxyServer = True");
  app->add_flag("--no-bypass-proxy", f->no_bypass_proxy, "BypassProxyServer = False")->excludes(bp);
  auto* kvp = app->add_flag("--replicate-host-kvp", f->kvp, "ReplicateHostKvpItems = True (the default)");
  app->add_flag("--no-replicate-host-kvp", f->no_kvp, "ReplicateHostKvpItems = False")->excludes(kvp);
}

// Builds the settings of `enable`/`set`/`reverse`/`failback` (exit code
// kExitOk, or why not).
int BuildSettings(Session& s, const SettingsFlags& f, v1::RelationshipSettings base, bool creating,
                  v1::RelationshipSettings* out) {
  auto settings = ApplyRelationshipOptions(f.ToOptions(), std::move(base), creating);
  if (!settings.ok()) return s.Error(settings.status().message(), kExitUsage);
  *out = std::move(*settings);
  return FillThumbprint(s, out);
}

// The settings of a new relationship in the other direction, from the
// current one: the same interval, history, disks...; the target is what
// the operator names, or left empty for the daemon (the old primary).
v1::RelationshipSettings ReverseBase(const std::optional<v1::Relationship>& current) {
  v1::RelationshipSettings base = current ? current->settings() : DefaultRelationshipSettings();
  base.clear_recovery_connection_point();
  base.clear_recovery_server_port_number();
  base.clear_certificate_thumbprint();
  return base;
}

// ---------------------------------------------------------------- output

std::string SizeText(uint64_t bytes) { return std::to_string(bytes) + " (" + FormatBytes(bytes) + ")"; }

void AddRelationshipRows(PropertyTable& t, const v1::Relationship& r) {
  const v1::RelationshipSettings& s = r.settings();
  t.Add("VMName", r.vm_name())
      .Add("VMId", r.vm_id())
      .Add("RelationshipIndex", std::to_string(r.relationship_index()))
      .Add("ReplicationMode", NumberAndName<ReplicationMode>(r.replication_mode()))
      .Add("ReplicationState", NumberAndName<ReplicationState>(r.replication_state()))
      .Add("ReplicationHealth", NumberAndName<ReplicationHealth>(r.replication_health()))
      .Add("LastReplicationTime", FormatUnixMs(r.last_replication_time_unix_ms()))
      .Add("LastApplyTime", FormatUnixMs(r.last_apply_time_unix_ms()))
      .Add("LastApplicationConsistentReplicationTime",
           FormatUnixMs(r.last_application_consistent_replication_time_unix_ms()))
      .Add("LastReplicationType", NumberAndName<ReplicationType>(r.last_replication_type()))
      .Add("FailedOverReplicationType", NumberAndName<ReplicationType>(r.failed_over_replication_type()))
      .Add("RecoveryConnectionPoint", s.recovery_connection_point())
      .Add("RecoveryServerPortNumber", std::to_string(s.recovery_server_port_number()))
      .Add("AuthenticationType", NumberAndName<AuthenticationType>(s.authentication_type()))
      .Add("CertificateThumbPrint", s.certificate_thumbprint())
      .Add("CompressionEnabled", std::string(BoolText(s.compression_enabled())))
      .Add("ReplicationInterval", std::to_string(s.replication_interval()))
      .Add("RecoveryHistory", std::to_string(s.recovery_history()))
      .Add("ApplicationConsistentSnapshotInterval", std::to_string(s.application_consistent_snapshot_interval()))
      .Add("IncludedDisks", s.included_disks().empty() ? std::string("(all)")
                                                       : Join({s.included_disks().begin(), s.included_disks().end()}))
      .Add("AutoResynchronizeEnabled", std::string(BoolText(s.auto_resynchronize_enabled())))
      .Add("AutoResynchronizeIntervalStart", FormatHhMm(s.auto_resynchronize_interval_start_min()))
      .Add("AutoResynchronizeIntervalEnd", FormatHhMm(s.auto_resynchronize_interval_end_min()))
      .Add("EnableWriteOrderPreservationAcrossDisks",
           std::string(BoolText(s.enable_write_order_preservation_across_disks())))
      .Add("BypassProxyServer", std::string(BoolText(s.bypass_proxy_server())))
      .Add("ReplicateHostKvpItems", std::string(BoolText(s.replicate_host_kvp_items())))
      .Add("RecoveryHostSystem", s.recovery_host_system())
      .Add("PrimaryConnectionPoint", s.primary_connection_point())
      .Add("PrimaryHostSystem", s.primary_host_system());
  // Not WMI properties (docs/api.md "ListReplications"): the primary's last
  // completed cycle (in the daemon's memory: "-" after its restart until the
  // next cycle) and the replica's applied sequence.
  if (r.replication_mode() == Number(ReplicationMode::kPrimary)) {
    if (!r.has_last_cycle()) {
      t.Add("LastCycle", "-");
    } else {
      const v1::LastCycle& c = r.last_cycle();
      t.Add("LastCycleSequence", std::to_string(c.sequence()) + (c.initial() ? " (initial)" : ""))
          .Add("LastCycleType", NumberAndName<ReplicationType>(c.replication_type()))
          .Add("LastCycleRecords", std::to_string(c.records()))
          .Add("LastCycleDataBytes", SizeText(c.data_bytes()))
          .Add("LastCycleZeroBytes", SizeText(c.zero_bytes()))
          .Add("LastCycleWireBytes", SizeText(c.wire_bytes()))
          .Add("LastCycleDuration", std::to_string(c.duration_ms()) + " ms")
          .Add("LastCycleFinishTime", FormatUnixMs(c.finished_unix_ms()));
    }
  } else if (r.replication_mode() == Number(ReplicationMode::kReplica)) {
    t.Add("AppliedSequence", std::to_string(r.applied_sequence()));
  }
}

void PrintStatistics(Session& s, const v1::StatisticsResponse& r) {
  const v1::ReplicationStatistics& st = r.statistics();
  const uint64_t n = st.replication_success_count();
  PropertyTable t;
  t.Add("StartStatisticTime", FormatUnixMs(st.start_statistic_time_unix_ms()))
      .Add("EndStatisticTime", FormatUnixMs(st.end_statistic_time_unix_ms()))
      .Add("ReplicationHealth", NumberAndName<ReplicationHealth>(st.replication_health()))
      .Add("ReplicationSuccessCount", std::to_string(n))
      .Add("ReplicationSize", SizeText(st.replication_size()))
      .Add("AverageReplicationSize", n > 0 ? SizeText(st.replication_size() / n) : "-")
      .Add("MaxReplicationSize", SizeText(st.max_replication_size()))
      .Add("ReplicationLatency", std::to_string(st.replication_latency_s()) + " s")
      .Add("AverageReplicationLatency", n > 0 ? std::to_string(st.replication_latency_s() / n) + " s" : "-")
      .Add("MaxReplicationLatency", std::to_string(st.max_replication_latency_s()) + " s")
      .Add("ReplicationMissCount", std::to_string(st.replication_miss_count()))
      .Add("NetworkFailureCount", std::to_string(st.network_failure_count()))
      .Add("ReplicationFailureCount", std::to_string(st.replication_failure_count()))
      .Add("PendingReplicationSize", SizeText(st.pending_replication_size()))
      .Add("ApplicationConsistentSnapshotFailureCount",
           std::to_string(st.application_consistent_snapshot_failure_count()))
      .Add("LastTestFailoverTime", FormatUnixMs(st.last_test_failover_time_unix_ms()));
  if (r.health_issues().empty()) t.Add("HealthIssues", "-");
  for (int i = 0; i < r.health_issues_size(); ++i) t.Add(i == 0 ? "HealthIssues" : "", r.health_issues(i));
  s.out() << t.Render();
}

// ---------------------------------------------------------------- get

int Get(Session& s, const std::string& vm) {
  v1::ReplicationsResponse list;
  if (int rc = s.Call(VMR_RPC(ListReplications), v1::Empty(), &list); rc != kExitOk) return rc;
  if (!vm.empty() && !Failed(list.result())) {
    auto* rels = list.mutable_relationships();
    rels->erase(std::remove_if(rels->begin(), rels->end(), [&](const v1::Relationship& r) { return !IsVm(r, vm); }),
                rels->end());
  }
  if (s.json()) s.PrintJson(list);
  if (Failed(list.result())) return s.HandleResult("ListReplications", list.result(), nullptr);
  if (!vm.empty() && list.relationships().empty()) {
    return s.Error("no replication relationship for VM '" + vm + "'", kExitFailed);
  }
  if (s.json()) return kExitOk;
  if (!vm.empty()) {
    for (int i = 0; i < list.relationships_size(); ++i) {
      if (i > 0) s.out() << "\n";
      PropertyTable t;
      AddRelationshipRows(t, list.relationships(i));
      s.out() << t.Render();
    }
    return kExitOk;
  }
  Table t({"VMName", "Mode", "State", "Health", "ReplicaServer", "LastReplicationTime"});
  for (const auto& r : list.relationships()) {
    t.AddRow({r.vm_name().empty() ? r.vm_id() : r.vm_name(), NameOrNumber<ReplicationMode>(r.replication_mode()),
              NumberAndName<ReplicationState>(r.replication_state()),
              NameOrNumber<ReplicationHealth>(r.replication_health()), r.settings().recovery_connection_point(),
              FormatUnixMs(r.last_replication_time_unix_ms())});
  }
  s.out() << t.Render();
  return kExitOk;
}

// ---------------------------------------------------------------- registration

void AddRelationshipVerbs(Registry& reg) {
  auto get_vm = std::make_shared<std::string>();
  reg.Add("get", "list replication relationships, or show one VM's in full (Get-VMReplication)", {"ListReplications"},
          [get_vm](Session& s) { return Get(s, *get_vm); })
      ->add_option("VM", *get_vm, "only this VM (name or UUID), shown property by property");

  auto enable = std::make_shared<SettingsFlags>();
  AddSettingsFlags(AddVmVerb(reg, "enable", "enable replication of a VM (CreateReplicationRelationship)",
                             {"GetSystemCertificates", "CreateReplicationRelationship"}, false,
                             [enable](Session& s, const VmArgs& a) {
                               v1::VmSettingsRequest request;
                               request.set_vm(a.vm);
                               if (int rc = BuildSettings(s, *enable, DefaultRelationshipSettings(), true,
                                                          request.mutable_settings());
                                   rc != kExitOk) {
                                 return rc;
                               }
                               return s.Invoke(VMR_RPC(CreateReplicationRelationship), request);
                             }),
                   enable.get(), /*create=*/true);

  auto set = std::make_shared<SettingsFlags>();
  AddSettingsFlags(
      AddVmVerb(reg, "set",
                "change replication settings (ModifyReplicationSettings); unnamed settings keep their value",
                {"ListReplications", "GetSystemCertificates", "ModifyReplicationSettings"}, false,
                [set](Session& s, const VmArgs& a) {
                  std::optional<v1::Relationship> current;
                  if (int rc = FindRelationship(s, a.vm, std::nullopt, &current); rc != kExitOk) return rc;
                  v1::VmSettingsRequest request;
                  request.set_vm(a.vm);
                  v1::RelationshipSettings base = current ? current->settings() : DefaultRelationshipSettings();
                  if (int rc = BuildSettings(s, *set, base, false, request.mutable_settings()); rc != kExitOk) {
                    return rc;
                  }
                  return s.Invoke(VMR_RPC(ModifyReplicationSettings), request);
                }),
      set.get(), /*create=*/false);

  struct StartOptions {
    std::string export_dir, at;
    bool seeded = false;
  };
  auto start = std::make_shared<StartOptions>();
  CLI::App* st = AddVmVerb(reg, "start", "start the initial replication (StartReplication)", {"StartReplication"},
                           false, [start](Session& s, const VmArgs& a) {
                             v1::StartReplicationRequest request;
                             request.set_vm(a.vm);
                             InitialReplicationType type = InitialReplicationType::kNetwork;
                             if (!start->export_dir.empty()) type = InitialReplicationType::kExport;
                             if (start->seeded) type = InitialReplicationType::kSeededNetwork;
                             request.set_initial_replication_type(Number(type));
                             request.set_initial_replication_export_location(start->export_dir);
                             if (!start->at.empty()) request.set_start_time_unix_s(*ParseTimeArg(start->at));
                             return s.Invoke(VMR_RPC(StartReplication), request);
                           });
  auto* ex = st->add_option("--export", start->export_dir,
                            "type 2: write the initial copy to this directory (one sub-directory per VM)");
  st->add_flag("--seeded", start->seeded, "type 3: the replica already holds a copy (seeded network)")->excludes(ex);
  st->add_option("--at", start->at, "StartTime: ISO 8601 or Unix seconds, at most 7 days ahead (default: now)")
      ->check(TimeValidator())
      ->excludes(ex);

  auto import_dir = std::make_shared<std::string>();
  AddVmVerb(reg, "import", "import an exported initial copy on the replica (ImportInitialReplica)",
            {"ImportInitialReplica"}, false,
            [import_dir](Session& s, const VmArgs& a) {
              v1::ImportInitialReplicaRequest request;
              request.set_vm(a.vm);
              request.set_initial_replication_import_location(*import_dir);
              return s.Invoke(VMR_RPC(ImportInitialReplica), request);
            })
      ->add_option("DIR", *import_dir, "the directory `start --export` wrote")
      ->required();
}

// Verbs that only request a replication state (RequestReplicationStateChange(Ex)).
struct StateVerb {
  const char* name;
  const char* description;
  RequestedReplicationState state;
};
constexpr StateVerb kStateVerbs[] = {
    {"suspend", "pause replication (state change 7, Suspend-VMReplication)", RequestedReplicationState::kSuspend},
    {"cancel-initial", "cancel the initial replication (state change 1)",
     RequestedReplicationState::kCancelInitialReplication},
    {"cancel-resync", "cancel a resynchronisation (state change 9)",
     RequestedReplicationState::kCancelResynchronization},
};

void AddStateVerbs(Registry& reg) {
  const std::vector<std::string> rpcs = {"RequestReplicationStateChange", "RequestReplicationStateChangeEx"};
  for (const StateVerb& v : kStateVerbs) {
    const RequestedReplicationState state = v.state;
    AddVmVerb(reg, v.name, v.description, rpcs, true,
              [state](Session& s, const VmArgs& a) { return StateChange(s, a, state); });
  }

  struct MarkOptions {
    std::vector<std::string> seeds;
    bool move = false;
  };
  auto mark = std::make_shared<MarkOptions>();
  CLI::App* m = AddVmVerb(reg, "mark-replica",
                          "on the replica host: the copies a seeded initial replication starts from become the "
                          "replica VM's disks (state change 2)",
                          rpcs, true, [mark](Session& s, const VmArgs& a) {
                            return StateChange(s, a, RequestedReplicationState::kMarkAsReplica, mark->seeds,
                                               mark->move);
                          });
  m->add_option("--disk", mark->seeds,
                "DISK=PATH: the copy for replica disk DISK (raw bytes of a file or block device; repeat per disk)");
  m->add_flag("--move", mark->move,
              "rename the copies into the replica store instead of copying them (same file system; the paths are "
              "gone afterwards)");

  struct ResumeOptions {
    bool resynchronize = false;
    std::string at;
  };
  auto resume = std::make_shared<ResumeOptions>();
  CLI::App* r = AddVmVerb(reg, "resume", "resume replication (state change 3, Resume-VMReplication)",
                          {"RequestReplicationStateChange", "RequestReplicationStateChangeEx", "Resynchronize"}, true,
                          [resume](Session& s, const VmArgs& a) {
                            if (resume->resynchronize) return Resynchronize(s, a.vm, a.rel().value_or(0), resume->at);
                            return StateChange(s, a, RequestedReplicationState::kResume);
                          });
  auto* rs = r->add_flag("--resynchronize", resume->resynchronize, "resynchronise instead (Resynchronize)");
  r->add_option("--at", resume->at, "with --resynchronize: StartTime, ISO 8601 or Unix seconds (default: now)")
      ->check(TimeValidator())
      ->needs(rs);

  auto resync_at = std::make_shared<std::string>();
  AddVmVerb(
      reg, "resync", "compare the disks of both sides and send the differences (Resynchronize)", {"Resynchronize"},
      true,
      [resync_at](Session& s, const VmArgs& a) { return Resynchronize(s, a.vm, a.rel().value_or(0), *resync_at); })
      ->add_option("--at", *resync_at, "StartTime: ISO 8601 or Unix seconds, at most 7 days ahead (default: now)")
      ->check(TimeValidator());
}

void AddFailoverVerbs(Registry& reg) {
  struct FailoverOptions {
    std::string point;
    bool force = false, prepare = false, as_test = false, start = false, no_network = false, test_ip = false;
  };
  auto fo = std::make_shared<FailoverOptions>();
  CLI::App* f =
      AddVmVerb(reg, "failover",
                "fail over to a recovery point (InitiateFailover); --prepare: planned failover on the primary; "
                "--as-test: a test VM (TestReplicaSystem)",
                {"InitiateFailover", "TestReplicaSystem", "RequestReplicationStateChange"}, false,
                [fo](Session& s, const VmArgs& a) {
                  if (fo->prepare) return StateChange(s, a, RequestedReplicationState::kPrepareForPlannedFailover);
                  v1::FailoverRequest request;
                  request.set_vm(a.vm);
                  request.set_recovery_point_id(fo->point);
                  request.set_force(fo->force);
                  request.set_start_vm(fo->start);
                  if (fo->as_test) {
                    request.set_test_network(fo->no_network ? 1 : 2);
                    request.set_apply_network_settings(fo->test_ip);
                    return s.Invoke(VMR_RPC(TestReplicaSystem), request);
                  }
                  return s.Invoke(VMR_RPC(InitiateFailover), request);
                });
  auto* point = f->add_option("--point", fo->point, "recovery point id (default: the latest)");
  auto* force = f->add_flag("--force", fo->force, "fail over even though the primary may still be running");
  auto* test = f->add_flag("--as-test", fo->as_test, "create a test VM '<VM> - Test' instead");
  auto* start = f->add_flag("--start", fo->start, "start the failover (or test) VM");
  auto* no_net = f->add_flag("--no-network", fo->no_network, "--as-test: the test VM gets no network adapter")
                     ->needs(test);
  auto* test_ip = f->add_flag("--with-ip-settings", fo->test_ip,
                              "--as-test: attach the failover IP settings (cloud-init seed) to the test VM too")
                      ->needs(test);
  f->add_flag("--prepare", fo->prepare, "on the primary: prepare a planned failover (state change 4)")
      ->excludes(point)
      ->excludes(force)
      ->excludes(test)
      ->excludes(start)
      ->excludes(no_net)
      ->excludes(test_ip);

  auto stop_test = std::make_shared<bool>(false);
  AddVmVerb(reg, "stop-failover",
            "undo a failover so another point can be chosen (RevertFailover); --test: remove the test VM "
            "(DestroySystem)",
            {"RevertFailover", "DestroySystem"}, false,
            [stop_test](Session& s, const VmArgs& a) {
              v1::VmRequest request;
              request.set_vm(a.vm);
              if (*stop_test) return s.Invoke(VMR_RPC(DestroySystem), request);
              return s.Invoke(VMR_RPC(RevertFailover), request);
            })
      ->add_flag("--test", *stop_test, "remove the test VM of `failover --as-test`");

  AddVmVerb(reg, "complete-failover", "make the failover final; other recovery points are deleted (CommitFailover)",
            {"CommitFailover"}, false, [](Session& s, const VmArgs& a) {
              v1::VmRequest request;
              request.set_vm(a.vm);
              return s.Invoke(VMR_RPC(CommitFailover), request);
            });

  struct ReverseOptions {
    SettingsFlags settings;
    bool no_start = false, start_vm = false;
  };
  auto reverse = std::make_shared<ReverseOptions>();
  CLI::App* rv = AddVmVerb(
      reg, "reverse",
      "replicate a failed-over VM back (ReverseReplicationRelationship), then start the reverse sync "
      "(StartReplication: only blocks that differ travel); default target: the old primary",
      {"ListReplications", "GetSystemCertificates", "ReverseReplicationRelationship", "StartReplication", "StartVm"},
      false, [reverse](Session& s, const VmArgs& a) {
        std::optional<v1::Relationship> current;
        if (int rc = FindRelationship(s, a.vm, 0, &current); rc != kExitOk) return rc;
        v1::VmSettingsRequest request;
        request.set_vm(a.vm);
        if (int rc = BuildSettings(s, reverse->settings, ReverseBase(current), false, request.mutable_settings());
            rc != kExitOk) {
          return rc;
        }
        if (int rc = s.Invoke(VMR_RPC(ReverseReplicationRelationship), request); rc != kExitOk) return rc;
        if (reverse->no_start || s.options().async) {
          if (!s.json()) s.out() << "reversed; start the reverse sync with: vmreplica start " << a.vm << "\n";
          return kExitOk;
        }
        // The reverse start: the job's result carries the bytes sent
        // (data_bytes, zero_bytes) and the candidate bytes compared by hash.
        v1::StartReplicationRequest start;
        start.set_vm(a.vm);
        start.set_initial_replication_type(Number(InitialReplicationType::kNetwork));
        if (int rc = s.Invoke(VMR_RPC(StartReplication), start); rc != kExitOk) return rc;
        if (reverse->start_vm) {
          v1::VmRequest vm;
          vm.set_vm(a.vm);
          if (int rc = s.Invoke(VMR_RPC(StartVm), vm); rc != kExitOk) return rc;
          if (!s.json()) s.out() << "VM " << a.vm << " started on this host\n";
        }
        return kExitOk;
      });
  AddSettingsFlags(rv, &reverse->settings, /*create=*/false);
  rv->add_flag("--no-start", reverse->no_start, "only reverse the relationship; run `start` later");
  auto* sv = rv->add_flag("--start-vm", reverse->start_vm, "start the VM here once the reverse sync is done (StartVm)");
  sv->excludes(rv->get_option("--no-start"));

  struct FailbackOptions {
    SettingsFlags settings;
    std::string point;
  };
  auto fb = std::make_shared<FailbackOptions>();
  CLI::App* b = AddVmVerb(
      reg, "failback", "fail a recovery VM back to the primary side (InitiateFailback)",
      {"ListReplications", "GetSystemCertificates", "InitiateFailback"}, false, [fb](Session& s, const VmArgs& a) {
        std::optional<v1::Relationship> current;
        if (int rc = FindRelationship(s, a.vm, 0, &current); rc != kExitOk) return rc;
        v1::FailbackRequest request;
        request.set_vm(a.vm);
        request.set_recovery_point_id(fb->point);
        if (int rc = BuildSettings(s, fb->settings, ReverseBase(current), false, request.mutable_settings());
            rc != kExitOk) {
          return rc;
        }
        return s.Invoke(VMR_RPC(InitiateFailback), request);
      });
  b->add_option("--point", fb->point, "RecoveryPointIdentifier (default: the latest)");
  AddSettingsFlags(b, &fb->settings, /*create=*/false);

  // The relationship defaults to 1: the extended relationship becomes the primary one.
  auto cm = std::make_shared<VmArgs>();
  cm->relationship = 1;
  AddVmVerb(reg, "change-mode-to-primary",
            "on a committed replica with an extended relationship: make that relationship the primary one "
            "(ChangeReplicationModeToPrimary; --relationship defaults to 1)",
            {"ChangeReplicationModeToPrimary"}, true, cm, [](Session& s, const VmArgs& a) {
              v1::VmRelationshipRequest request;
              request.set_vm(a.vm);
              request.set_relationship_index(a.relationship);
              return s.Invoke(VMR_RPC(ChangeReplicationModeToPrimary), request);
            });
}

void AddMaintenanceVerbs(Registry& reg) {
  AddVmVerb(reg, "remove", "remove replication on this side; the VM is kept (RemoveReplicationRelationship(Ex))",
            {"RemoveReplicationRelationship", "RemoveReplicationRelationshipEx"}, true,
            [](Session& s, const VmArgs& a) {
              return CallVmOrEx(s, a, VMR_RPC(RemoveReplicationRelationship), VMR_RPC(RemoveReplicationRelationshipEx));
            });
  AddVmVerb(reg, "measure", "replication statistics and health (GetReplicationStatistics(Ex), Measure-VMReplication)",
            {"GetReplicationStatistics", "GetReplicationStatisticsEx"}, true, [](Session& s, const VmArgs& a) {
              return CallVmOrEx(s, a, VMR_RPC(GetReplicationStatistics), VMR_RPC(GetReplicationStatisticsEx),
                                [&s](const v1::StatisticsResponse& r) { PrintStatistics(s, r); });
            });
  AddVmVerb(reg, "points", "the recovery points of a replica VM, oldest first (ListRecoveryPoints)",
            {"ListRecoveryPoints"}, false, [](Session& s, const VmArgs& a) {
              v1::VmRequest request;
              request.set_vm(a.vm);
              return s.Invoke(VMR_RPC(ListRecoveryPoints), request, [&s](const v1::RecoveryPointsResponse& r) {
                Table t({"Id", "Time", "Kind", "Sequence"});
                for (const auto& p : r.points()) {
                  t.AddRow({p.id(), FormatUnixMs(p.time_unix_ms()), NumberAndName<ReplicationType>(p.kind()),
                            std::to_string(p.sequence())});
                }
                if (r.points().empty()) {
                  s.out() << "no recovery points\n";
                } else {
                  s.out() << t.Render();
                }
              });
            });
  AddVmVerb(reg, "reset-statistics", "start a new statistics window (ResetReplicationStatistics(Ex))",
            {"ResetReplicationStatistics", "ResetReplicationStatisticsEx"}, true, [](Session& s, const VmArgs& a) {
              return CallVmOrEx(s, a, VMR_RPC(ResetReplicationStatistics), VMR_RPC(ResetReplicationStatisticsEx));
            });

  struct FailoverIpOptions {
    std::string adapter;
    std::vector<std::string> ips, subnets, gateways, dns;
    bool dhcp = false;
  };
  auto ip = std::make_shared<FailoverIpOptions>();
  CLI::App* f = AddVmVerb(
      reg, "set-failover-ip",
      "guest IP settings of one NIC applied after failover (SetFailoverNetworkAdapterSettings); neither --ip nor "
      "--dhcp: removes that NIC's settings",
      {"SetFailoverNetworkAdapterSettings"}, false, [ip](Session& s, const VmArgs& a) {
        if (ip->gateways.size() > 5) return s.Error("--gateway: at most 5 default gateways", kExitUsage);
        v1::FailoverNetworkRequest request;
        request.set_vm(a.vm);
        v1::NetworkAdapterSettings* n = request.add_adapters();
        n->set_adapter(ip->adapter);
        for (const auto& v : ip->ips) n->add_ip_addresses(v);
        for (const auto& v : ip->subnets) n->add_subnets(v);
        for (const auto& v : ip->gateways) n->add_default_gateways(v);
        for (const auto& v : ip->dns) n->add_dns_servers(v);
        n->set_dhcp_enabled(ip->dhcp);
        // ProtocolIFType from the addresses given: 4096 IPv4, 4097 IPv6, 4098 both (and DHCP).
        bool v4 = false, v6 = false;
        for (const auto* list : {&ip->ips, &ip->gateways, &ip->dns}) {
          for (const auto& v : *list) (v.find(':') != std::string::npos ? v6 : v4) = true;
        }
        n->set_protocol_if_type(ip->dhcp || (v4 && v6) ? 4098 : v6 ? 4097 : 4096);
        return s.Invoke(VMR_RPC(SetFailoverNetworkAdapterSettings), request);
      });
  f->add_option("--adapter", ip->adapter, "the MAC address of one of the VM's NICs (`vm get VM` lists them)")
      ->required();
  auto* ips = f->add_option("--ip", ip->ips, "static IP address, IPv4 or IPv6 (repeatable)");
  auto* subnets = f->add_option("--subnet", ip->subnets,
                                "prefix length or dotted IPv4 mask, one per --ip, same order (repeatable)");
  auto* gw = f->add_option("--gateway", ip->gateways, "default gateway (repeatable, at most 5)");
  f->add_option("--dns", ip->dns, "DNS server (repeatable)");
  f->add_flag("--dhcp", ip->dhcp, "DHCPEnabled: the guest takes its addresses from DHCP")
      ->excludes(ips)
      ->excludes(subnets)
      ->excludes(gw);

  AddVmVerb(reg, "get-failover-ip",
            "the failover IP settings stored for a VM's NICs (GetFailoverNetworkAdapterSettings)",
            {"GetFailoverNetworkAdapterSettings"}, false, [](Session& s, const VmArgs& a) {
              v1::VmRequest request;
              request.set_vm(a.vm);
              return s.Invoke(VMR_RPC(GetFailoverNetworkAdapterSettings), request,
                              [&s](const v1::FailoverNetworkResponse& r) {
                                auto join = [](const google::protobuf::RepeatedPtrField<std::string>& list) {
                                  std::string out;
                                  for (const auto& v : list) out += (out.empty() ? "" : ",") + v;
                                  return out.empty() ? std::string("-") : out;
                                };
                                if (r.adapters().empty()) {
                                  s.out() << "no failover IP settings\n";
                                  return;
                                }
                                Table t({"Adapter", "DHCP", "IPAddresses", "Subnets", "DefaultGateways", "DNSServers"});
                                for (const auto& n : r.adapters()) {
                                  t.AddRow({n.adapter(), n.dhcp_enabled() ? "yes" : "no", join(n.ip_addresses()),
                                            join(n.subnets()), join(n.default_gateways()), join(n.dns_servers())});
                                }
                                s.out() << t.Render();
                              });
            });
}

}  // namespace

void AddReplicationVerbs(Registry& reg) {
  AddRelationshipVerbs(reg);
  AddStateVerbs(reg);
  AddFailoverVerbs(reg);
  AddMaintenanceVerbs(reg);
}

}  // namespace vmreplica::cli
