#include "service/control_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>

#include "service/authorization.h"
#include "service/connection_test.h"
#include "service/admin_auth.h"
#include "service/convert.h"
#include "service/tls.h"
#include "vmreplica/cloud_init.h"
#include "vmreplica/model/return_code.h"
#include "vmreplica/model/transitions.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::service {
namespace {

void SetResult(v1::MethodResult* r, ReturnCode code, const std::string& description = "") {
  r->set_return_value(Number(code));
  r->set_error_description(description);
}

void SetError(v1::MethodResult* r, const Status& s) {
  SetResult(r, ToReturnCode(s), s.message());
}

// Fills `r` from a method's outcome: Completed (0) or the mapped error.
grpc::Status Answer(v1::MethodResult* r, const Status& s) {
  if (s.ok()) {
    SetResult(r, ReturnCode::kCompleted);
  } else {
    SetError(r, s);
  }
  return grpc::Status::OK;
}

void SetJobStarted(v1::MethodResult* r, const JobRecord& job) {
  SetResult(r, ReturnCode::kJobStarted);
  ToProto(job, NowMs(), r->mutable_job());
}

// Names the issue that brings a method, so the answer says what is missing.
void NotSupportedYet(v1::MethodResult* r, const char* method, const char* capability) {
  SetResult(r, ReturnCode::kNotSupported,
            std::string(method) + " is not supported by this vmreplica build yet (" + capability + ")");
}

constexpr const char* kReplicationCapability = "replication end to end is not implemented yet";
constexpr const char* kFailoverCapability = "the failover family is not implemented yet";

}  // namespace

bool ControlService::Authorize(const grpc::ServerContext& context, const char* method,
                       v1::MethodResult* result) const {
  return AuthorizeAdmin(*env_, remote_, context, method, result);
}

bool ControlService::RefuseOverOwnListener(const char* what, v1::MethodResult* result) const {
  if (!remote_) return false;
  SetResult(result, ReturnCode::kSystemInUse,
            std::string(what) + " would cut the connection this request came on; use the local socket");
  return true;
}

Status ControlService::SetListenerRunning(bool running) {
  if (env_->listener == nullptr) return Status::NotSupported("this daemon has no replica listener");
  return running ? env_->listener->StartListener() : env_->listener->StopListener();
}

// ---------------------------------------------------------------- server

grpc::Status ControlService::TestReplicationConnection(grpc::ServerContext* ctx,
                                                       const v1::TestReplicationConnectionRequest* req,
                                                       v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "TestReplicationConnection", r)) return grpc::Status::OK;
  const std::string host = req->recovery_connection_point();
  if (Status s = ValidateHostName(host, "RecoveryConnectionPoint"); !s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  if (req->recovery_server_port_number() < 1 || req->recovery_server_port_number() > 65535) {
    SetResult(r, ReturnCode::kInvalidParameter,
              "RecoveryServerPortNumber: " + std::to_string(req->recovery_server_port_number()) +
                  " is not in 1..65535");
    return grpc::Status::OK;
  }
  if (req->authentication_type() == Number(AuthenticationType::kKerberos)) {
    SetResult(r, ReturnCode::kNotSupported,
              "AuthenticationType 1 (Kerberos) is not supported; use 2 (Certificate)");
    return grpc::Status::OK;
  }
  if (req->authentication_type() != Number(AuthenticationType::kCertificate)) {
    SetResult(r, ReturnCode::kInvalidParameter,
              "AuthenticationType: " + std::to_string(req->authentication_type()) +
                  " is not one of 1 (Kerberos), 2 (Certificate)");
    return grpc::Status::OK;
  }
  if (!req->certificate_thumbprint().empty()) {
    auto mine = security::InspectCertificatePem(env_->identity.cert_pem);
    std::string want = req->certificate_thumbprint();
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::toupper(c); });
    if (!mine.ok() || mine->thumbprint_sha1 != want) {
      SetResult(r, ReturnCode::kInvalidParameter,
                "CertificateThumbPrint: no certificate with thumbprint " + req->certificate_thumbprint() +
                    " on this host (GetSystemCertificates lists them)");
      return grpc::Status::OK;
    }
  }
  const uint16_t port = static_cast<uint16_t>(req->recovery_server_port_number());
  nlohmann::json params = {{"recovery_connection_point", host}, {"recovery_server_port_number", port}};
  ServiceEnv* env = env_;
  // Not resumable: a connection test from before a restart says nothing
  // about the connection now; after a restart it ends as Exception.
  auto job = env_->jobs->Start(JobType::kTestConnection, JoinHostPort(host, port), params.dump(),
                               /*cancellable=*/false, /*resumable=*/false, [env, host, port](JobContext& jc) {
                                 auto out = TestConnection(*env, host, port);
                                 if (!out.ok()) return out.status();
                                 jc.SetResult(out->dump());
                                 return Status::Ok();
                               });
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::AddAuthorizationEntry(grpc::ServerContext* ctx, const v1::AuthorizationEntryRequest* req,
                                                   v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "AddAuthorizationEntry", r)) return grpc::Status::OK;
  AuthorizationEntry e = FromProto(req->entry());
  Status s = ValidateAuthorizationEntry(e);
  if (s.ok()) s = env_->catalog->AddAuthorizationEntry(e);
  if (!s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  spdlog::info("authorization entry added: {} -> {} (trust group '{}')", e.allowed_primary_host_system,
               e.replica_storage_location, e.trust_group);
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ModifyAuthorizationEntry(grpc::ServerContext* ctx,
                                                      const v1::AuthorizationEntryRequest* req,
                                                      v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ModifyAuthorizationEntry", r)) return grpc::Status::OK;
  AuthorizationEntry e = FromProto(req->entry());
  Status s = ValidateAuthorizationEntry(e);
  if (s.ok()) s = env_->catalog->ModifyAuthorizationEntry(e);
  if (!s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  spdlog::info("authorization entry modified: {} -> {} (trust group '{}')", e.allowed_primary_host_system,
               e.replica_storage_location, e.trust_group);
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::RemoveAuthorizationEntry(grpc::ServerContext* ctx,
                                                      const v1::RemoveAuthorizationEntryRequest* req,
                                                      v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RemoveAuthorizationEntry", r)) return grpc::Status::OK;
  Status s = ValidateHostPattern(req->allowed_primary_host_system(), "AllowedPrimaryHostSystem");
  if (s.ok()) s = env_->catalog->RemoveAuthorizationEntry(req->allowed_primary_host_system());
  if (!s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  spdlog::info("authorization entry removed: {}", req->allowed_primary_host_system());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::SetAuthorizationEntry(grpc::ServerContext* ctx, const v1::SetAuthorizationEntryRequest*,
                                                   v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "SetAuthorizationEntry", r)) return grpc::Status::OK;
  // Binds a replica VM to an entry: needs replica VMs, which replication brings.
  NotSupportedYet(r, "SetAuthorizationEntry", kReplicationCapability);
  return grpc::Status::OK;
}

grpc::Status ControlService::ModifyServiceSettings(grpc::ServerContext* ctx, const v1::ServiceSettingsRequest* req,
                                                   v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ModifyServiceSettings", r)) return grpc::Status::OK;
  auto settings = FromProto(req->settings());
  Status s = settings.ok() ? ValidateServerSettings(*settings) : settings.status();
  if (!s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  auto auth = settings->allowed_authentication_type;
  if (auth == AllowedAuthenticationType::kKerberos || auth == AllowedAuthenticationType::kKerberosAndCertificate) {
    SetResult(r, ReturnCode::kNotSupported,
              "AllowedAuthenticationType: Kerberos is not supported; use 2 (Certificate) or 0 (none)");
    return grpc::Status::OK;
  }
  auto old = env_->catalog->GetServerSettings();
  if (!old.ok()) return Answer(r, old.status());
  const bool port_changed = old->https_port != settings->https_port;
  if (port_changed && RefuseOverOwnListener("changing HttpsPort", r)) return grpc::Status::OK;
  if (s = env_->catalog->PutServerSettings(*settings); !s.ok()) {
    SetError(r, s);
    return grpc::Status::OK;
  }
  spdlog::info("service settings: RecoveryServerEnabled={} AllowedAuthenticationType={} HttpsPort={} "
               "MonitoringInterval={}s MonitoringStartTime={}min",
               settings->recovery_server_enabled, Number(auth), settings->https_port,
               settings->monitoring_interval_s, settings->monitoring_start_time_min);
  if (port_changed && env_->listener && env_->listener->ListenerRunning()) {
    s = SetListenerRunning(false);
    if (s.ok()) s = SetListenerRunning(true);
    if (!s.ok()) {
      SetError(r, s.WithContext("settings saved, but the listener did not restart on port " +
                                std::to_string(settings->https_port)));
      return grpc::Status::OK;
    }
  }
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::GetSystemCertificates(grpc::ServerContext* ctx, const v1::Empty*,
                                                   v1::CertificatesResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetSystemCertificates", r)) return grpc::Status::OK;
  auto host = security::InspectCertificatePem(env_->identity.cert_pem);
  auto cas = security::InspectCertificateChainPem(env_->identity.ca_pem);
  if (!host.ok() || !cas.ok()) {
    SetError(r, host.ok() ? cas.status() : host.status());
    return grpc::Status::OK;
  }
  ToProto(*host, "host", resp->add_certificates());
  for (const auto& ca : *cas) ToProto(ca, "ca", resp->add_certificates());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::RequestStateChange(grpc::ServerContext* ctx, const v1::ServiceStateRequest* req,
                                                v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RequestStateChange", r)) return grpc::Status::OK;
  // CIM_EnabledLogicalElement.RequestedState: 2 Enabled, 3 Disabled.
  if (req->requested_state() != 2 && req->requested_state() != 3) {
    SetResult(r, ReturnCode::kInvalidParameter,
              "RequestedState: " + std::to_string(req->requested_state()) + " is not one of 2 (Enabled), 3 (Disabled)");
    return grpc::Status::OK;
  }
  const bool enable = req->requested_state() == 2;
  if (!enable && RefuseOverOwnListener("stopping the listener", r)) return grpc::Status::OK;
  Status s = SetListenerRunning(enable);
  return Answer(r, s);
}

grpc::Status ControlService::StartService(grpc::ServerContext* ctx, const v1::Empty*, v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "StartService", r)) return grpc::Status::OK;
  Status s = SetListenerRunning(true);
  return Answer(r, s);
}

grpc::Status ControlService::StopService(grpc::ServerContext* ctx, const v1::Empty*, v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "StopService", r)) return grpc::Status::OK;
  if (RefuseOverOwnListener("stopping the listener", r)) return grpc::Status::OK;
  Status s = SetListenerRunning(false);
  return Answer(r, s);
}

// ---------------------------------------------------------------- reads

grpc::Status ControlService::GetServiceSettings(grpc::ServerContext* ctx, const v1::Empty*,
                                                v1::ServiceSettingsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetServiceSettings", r)) return grpc::Status::OK;
  auto s = env_->catalog->GetServerSettings();
  if (!s.ok()) return Answer(r, s.status());
  ToProto(*s, resp->mutable_settings());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ListAuthorizationEntries(grpc::ServerContext* ctx, const v1::Empty*,
                                                      v1::AuthorizationEntriesResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ListAuthorizationEntries", r)) return grpc::Status::OK;
  auto entries = env_->catalog->ListAuthorizationEntries();
  if (!entries.ok()) return Answer(r, entries.status());
  for (const auto& e : *entries) ToProto(e, resp->add_entries());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::GetServiceStatus(grpc::ServerContext* ctx, const v1::Empty*,
                                              v1::ServiceStatusResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetServiceStatus", r)) return grpc::Status::OK;
  resp->set_version(env_->version);
  resp->set_host_name(env_->host_name);
  resp->set_listener_running(env_->listener && env_->listener->ListenerRunning());
  resp->set_listen_address(env_->listener ? env_->listener->ListenAddress() : "");
  resp->set_protocol_version(kProtocolVersion);
  for (const auto& f : kFeatures) resp->add_features(f);
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ListReplications(grpc::ServerContext* ctx, const v1::Empty*,
                                              v1::ReplicationsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ListReplications", r)) return grpc::Status::OK;
  auto rels = env_->catalog->ListRelationships();
  if (!rels.ok()) return Answer(r, rels.status());
  for (const auto& rel : *rels) {
    auto* p = resp->add_relationships();
    p->set_vm_id(rel.vm_id);
    auto vm = env_->catalog->GetVm(rel.vm_id);
    if (!vm.ok()) return Answer(r, vm.status());  // a catalog failure is not an empty name
    if (vm->has_value()) p->set_vm_name((*vm)->name);
    p->set_relationship_index(static_cast<uint32_t>(rel.index));
    p->set_replication_mode(Number(rel.local_mode));
    p->set_replication_state(Number(rel.state));
    p->set_replication_health(Number(rel.health));
    ToProto(rel.settings, p->mutable_settings());
    p->set_last_replication_time_unix_ms(rel.last_replication_ms);
    p->set_last_apply_time_unix_ms(rel.last_apply_ms);
    p->set_last_application_consistent_replication_time_unix_ms(rel.last_app_consistent_ms);
    p->set_last_replication_type(Number(rel.last_replication_type));
    p->set_failed_over_replication_type(Number(rel.failed_over_replication_type));
    // Not WMI: for measuring (docs/api.md "ListReplications"). The primary's
    // last cycle is kept in the engine's memory only; the replica's applied
    // sequence is the relationship's sequence there (set by each apply).
    if (rel.local_mode == ReplicationMode::kPrimary && env_->replication) {
      if (auto last = env_->replication->LastCycle(rel.vm_id)) {
        auto* c = p->mutable_last_cycle();
        c->set_sequence(last->report.sequence);
        c->set_replication_type(Number(last->report.kind));
        c->set_initial(last->report.initial);
        c->set_records(last->report.records);
        c->set_data_bytes(last->report.data_bytes);
        c->set_zero_bytes(last->report.zero_bytes);
        c->set_wire_bytes(last->report.wire_bytes);
        c->set_duration_ms(last->report.duration_ms);
        c->set_finished_unix_ms(last->finished_ms);
      }
    } else if (rel.local_mode == ReplicationMode::kReplica) {
      p->set_applied_sequence(rel.sequence);
    }
  }
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ListRecoveryPoints(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                                v1::RecoveryPointsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ListRecoveryPoints", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, Status::NotSupported("this daemon runs without the replication engine"));
  auto vm = env_->replication->ResolveVm(req->vm());
  if (!vm.ok()) return Answer(r, vm.status());
  auto points = env_->catalog->ListRecoveryPoints(vm->id);
  if (!points.ok()) return Answer(r, points.status());
  for (const auto& p : *points) {
    if (p.sequence == 0) continue;  // the empty store before the initial copy: nothing to recover
    auto* out = resp->add_points();
    out->set_id(p.id);
    out->set_vm_id(p.vm_id);
    out->set_time_unix_ms(p.time_ms);
    out->set_kind(p.kind);
    out->set_sequence(p.sequence);
    out->set_generation_id(p.generation_id);
  }
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- jobs

grpc::Status ControlService::GetJob(grpc::ServerContext* ctx, const v1::JobRequest* req, v1::JobResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetJob", r)) return grpc::Status::OK;
  auto job = env_->jobs->Get(req->id());
  if (!job.ok()) return Answer(r, job.status());
  ToProto(*job, NowMs(), resp->mutable_job());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ListJobs(grpc::ServerContext* ctx, const v1::Empty*, v1::JobsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ListJobs", r)) return grpc::Status::OK;
  auto jobs = env_->jobs->List();
  if (!jobs.ok()) return Answer(r, jobs.status());
  const int64_t now = NowMs();
  for (const auto& j : *jobs) ToProto(j, now, resp->add_jobs());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::WaitJob(grpc::ServerContext* ctx, const v1::WaitJobRequest* req, v1::JobResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "WaitJob", r)) return grpc::Status::OK;
  // Bounded so that one call never holds a handler thread for long; clients loop.
  auto timeout = std::chrono::milliseconds(std::min<uint32_t>(req->timeout_ms(), 60000));
  auto job = env_->jobs->Wait(req->id(), timeout);
  if (!job.ok()) return Answer(r, job.status());
  ToProto(*job, NowMs(), resp->mutable_job());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::CancelJob(grpc::ServerContext* ctx, const v1::JobRequest* req, v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "CancelJob", r)) return grpc::Status::OK;
  Status s = env_->jobs->Cancel(req->id());
  return Answer(r, s);
}

// ---------------------------------------------------------------- replication

namespace {

Status NoEngine() { return Status::NotSupported("this daemon runs without the replication engine"); }

void ToProto(const StatisticsRecord& s, v1::StatisticsResponse* resp) {
  auto* p = resp->mutable_statistics();
  p->set_start_statistic_time_unix_ms(s.start_ms);
  p->set_end_statistic_time_unix_ms(s.end_ms);
  p->set_replication_success_count(s.replication_success_count);
  p->set_replication_size(s.replication_size_bytes);
  p->set_max_replication_size(s.max_replication_size_bytes);
  p->set_replication_latency_s(s.replication_latency_ms / 1000);
  p->set_max_replication_latency_s(s.max_replication_latency_ms / 1000);
  p->set_replication_miss_count(s.replication_miss_count);
  p->set_network_failure_count(s.network_failure_count);
  p->set_replication_failure_count(s.replication_failure_count);
  p->set_pending_replication_size(s.pending_replication_size_bytes);
  p->set_application_consistent_snapshot_failure_count(s.application_consistent_snapshot_failure_count);
  p->set_replication_health(Number(s.replication_health));
  p->set_last_test_failover_time_unix_ms(s.last_test_failover_ms);
  p->set_initial_replication_size(s.initial_replication_size_bytes);
  for (const auto& i : s.health_issues) resp->add_health_issues(i);
}

}  // namespace

grpc::Status ControlService::CreateReplicationRelationship(grpc::ServerContext* ctx, const v1::VmSettingsRequest* req,
                                                           v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "CreateReplicationRelationship", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  auto settings = FromProto(req->settings());
  if (!settings.ok()) return Answer(r, settings.status());
  Status s = env_->replication->CreateRelationship(req->vm(), *settings);
  if (s.ok()) spdlog::info("replication relationship created for VM {}", req->vm());
  return Answer(r, s);
}

grpc::Status ControlService::StartReplication(grpc::ServerContext* ctx, const v1::StartReplicationRequest* req,
                                              v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "StartReplication", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  const uint32_t type = req->initial_replication_type();
  if (type == Number(InitialReplicationType::kExport)) {
    // StartTime is ignored for an export, as in the reference.
    auto job = env_->replication->StartExportReplication(req->vm(), req->initial_replication_export_location());
    if (!job.ok()) return Answer(r, job.status());
    SetJobStarted(r, *job);
    return grpc::Status::OK;
  }
  if (type != Number(InitialReplicationType::kNetwork) && type != Number(InitialReplicationType::kSeededNetwork)) {
    return Answer(r, Status::InvalidArgument("InitialReplicationType: " + std::to_string(type) +
                                             " is not one of 1 (network), 2 (export), 3 (seeded)"));
  }
  auto job = env_->replication->StartReplication(req->vm(), req->start_time_unix_s(),
                                                 type == Number(InitialReplicationType::kSeededNetwork));
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::ModifyReplicationSettings(grpc::ServerContext* ctx, const v1::VmSettingsRequest* req,
                                                       v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ModifyReplicationSettings", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  auto settings = FromProto(req->settings());
  if (!settings.ok()) return Answer(r, settings.status());
  return Answer(r, env_->replication->ModifySettings(req->vm(), *settings));
}

grpc::Status ControlService::RemoveReplicationRelationship(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                                           v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RemoveReplicationRelationship", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  return Answer(r, env_->replication->RemoveRelationship(req->vm(), 0));
}

grpc::Status ControlService::RemoveReplicationRelationshipEx(grpc::ServerContext* ctx,
                                                             const v1::VmRelationshipRequest* req,
                                                             v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RemoveReplicationRelationshipEx", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  if (req->relationship_index() > 1) {
    return Answer(r, Status::InvalidArgument("RelationshipType: " + std::to_string(req->relationship_index()) +
                                             " is not 0 or 1"));
  }
  return Answer(r, env_->replication->RemoveRelationship(req->vm(), static_cast<int>(req->relationship_index())));
}

grpc::Status ControlService::GetReplicationStatistics(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                                      v1::StatisticsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetReplicationStatistics", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  auto stats = env_->replication->GetStatistics(req->vm(), 0);
  if (!stats.ok()) return Answer(r, stats.status());
  ToProto(*stats, resp);
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::GetReplicationStatisticsEx(grpc::ServerContext* ctx, const v1::VmRelationshipRequest* req,
                                                        v1::StatisticsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetReplicationStatisticsEx", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  if (req->relationship_index() > 1) {
    return Answer(r, Status::InvalidArgument("RelationshipType: " + std::to_string(req->relationship_index()) +
                                             " is not 0 or 1"));
  }
  auto stats = env_->replication->GetStatistics(req->vm(), static_cast<int>(req->relationship_index()));
  if (!stats.ok()) return Answer(r, stats.status());
  ToProto(*stats, resp);
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status ControlService::ResetReplicationStatistics(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                                        v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ResetReplicationStatistics", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  return Answer(r, env_->replication->ResetStatistics(req->vm(), 0));
}

grpc::Status ControlService::ResetReplicationStatisticsEx(grpc::ServerContext* ctx,
                                                          const v1::VmRelationshipRequest* req,
                                                          v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ResetReplicationStatisticsEx", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  if (req->relationship_index() > 1) {
    return Answer(r, Status::InvalidArgument("RelationshipType: " + std::to_string(req->relationship_index()) +
                                             " is not 0 or 1"));
  }
  return Answer(r, env_->replication->ResetStatistics(req->vm(), static_cast<int>(req->relationship_index())));
}

grpc::Status ControlService::RequestReplicationStateChange(grpc::ServerContext* ctx,
                                                           const v1::StateChangeRequest* req,
                                                           v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RequestReplicationStateChange", r)) return grpc::Status::OK;
  if (req->requested_state() == Number(RequestedReplicationState::kMarkAsReplica) && env_->failover) {
    // On the replica host: register the seed copies (FailoverManager).
    auto job = env_->failover->MarkAsReplica(req->vm(), {req->seed_disks().begin(), req->seed_disks().end()},
                                             req->move_seed_disks());
    if (!job.ok()) return Answer(r, job.status());
    SetJobStarted(r, *job);
    return grpc::Status::OK;
  }
  return ChangeState(req->vm(), 0, req->requested_state(), r);
}

grpc::Status ControlService::RequestReplicationStateChangeEx(grpc::ServerContext* ctx,
                                                             const v1::StateChangeRequest* req,
                                                             v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RequestReplicationStateChangeEx", r)) return grpc::Status::OK;
  if (req->relationship_index() > 1) {
    return Answer(r, Status::InvalidArgument("RelationshipType: " + std::to_string(req->relationship_index()) +
                                             " is not 0 or 1"));
  }
  return ChangeState(req->vm(), static_cast<int>(req->relationship_index()), req->requested_state(), r);
}

grpc::Status ControlService::ChangeState(const std::string& vm, int index, uint32_t requested,
                                         v1::MethodResult* r) {
  if (!env_->replication) return Answer(r, NoEngine());
  auto state = Parse<RequestedReplicationState>(std::to_string(requested));
  if (!state) {
    return Answer(r, Status::InvalidArgument("RequestedState: " + std::to_string(requested) +
                                             " is not one of 1, 2, 3, 4, 7, 9"));
  }
  // 4 (prepare a planned failover) answers a job (docs/failover.md section 9).
  if (*state == RequestedReplicationState::kPrepareForPlannedFailover && index == 0) {
    auto job = env_->replication->PrepareForPlannedFailover(vm);
    if (!job.ok()) return Answer(r, job.status());
    SetJobStarted(r, *job);
    return grpc::Status::OK;
  }
  return Answer(r, env_->replication->RequestStateChange(vm, index, *state));
}

grpc::Status ControlService::Resynchronize(grpc::ServerContext* ctx, const v1::ResynchronizeRequest* req,
                                           v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "Resynchronize", r)) return grpc::Status::OK;
  if (!env_->replication) return Answer(r, NoEngine());
  if (req->relationship_index() > 1) {
    return Answer(r, Status::InvalidArgument("RelationshipType: " + std::to_string(req->relationship_index()) +
                                             " is not 0 or 1"));
  }
  if (req->relationship_index() == 1) {
    return Answer(r, Status::NotSupported("extended replication is not supported yet"));
  }
  auto job = env_->replication->Resynchronize(req->vm(), req->start_time_unix_s());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- failover IP settings
//
// SetFailoverNetworkAdapterSettings stores, per NIC of a VM, the IP settings
// for the failover VM's cloud-init NoCloud seed (vmreplica/cloud_init.h). Adapters are named by the MAC of one of the NICs
// in the VM's stored definition; each call replaces the settings of the
// adapters it names and keeps the others; an adapter with neither
// IPAddresses nor DHCPEnabled removes its settings.

namespace {

// ProtocolIFType of Msvm_FailoverNetworkAdapterSettings.
constexpr uint32_t kProtocolIpv4 = 4096;
constexpr uint32_t kProtocolIpv6 = 4097;
constexpr uint32_t kProtocolBoth = 4098;
// Bound on IPAddresses / Subnets / DNSServers per adapter (the request comes
// from the network; DefaultGateways has its own limit of 5).
constexpr int kMaxAddressesPerList = 32;

// The VM named by `vm` (its UUID or its unique name), read from the catalog:
// primary, replica or unreplicated alike.
Result<VmRecord> FindNetworkVm(Catalog* catalog, const std::string& vm) {
  if (vm.empty()) return Status::InvalidArgument("VM: a name or UUID is required");
  VMR_ASSIGN_OR_RETURN(auto by_id, catalog->GetVm(vm));
  if (by_id.has_value()) return *by_id;
  auto by_name = catalog->FindVmByName(vm);
  if (!by_name.ok()) {
    if (by_name.status().code() == Code::kFailedPrecondition) {
      return Status::InvalidArgument("VM: several VMs are named \"" + vm + "\"; use the UUID");
    }
    return by_name.status();
  }
  if (!by_name->has_value()) return Status::NotFound("no VM named or with id '" + vm + "' on this host");
  return **by_name;
}

std::string LowerAscii(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

FailoverNetworkAdapterSettings FromProto(const v1::NetworkAdapterSettings& p) {
  FailoverNetworkAdapterSettings s;
  s.adapter = p.adapter();
  s.ip_addresses.assign(p.ip_addresses().begin(), p.ip_addresses().end());
  s.subnets.assign(p.subnets().begin(), p.subnets().end());
  s.default_gateways.assign(p.default_gateways().begin(), p.default_gateways().end());
  s.dns_servers.assign(p.dns_servers().begin(), p.dns_servers().end());
  s.dhcp_enabled = p.dhcp_enabled();
  return s;
}

void ToProto(const FailoverNetworkRecord& r, v1::NetworkAdapterSettings* p) {
  p->set_adapter(r.adapter);
  bool v4 = false, v6 = false;
  for (const auto* list : {&r.ip_addresses, &r.default_gateways, &r.dns_servers}) {
    for (const auto& v : *list) (v.find(':') != std::string::npos ? v6 : v4) = true;
  }
  for (const auto& v : r.ip_addresses) p->add_ip_addresses(v);
  for (const auto& v : r.subnets) p->add_subnets(v);
  for (const auto& v : r.default_gateways) p->add_default_gateways(v);
  for (const auto& v : r.dns_servers) p->add_dns_servers(v);
  p->set_dhcp_enabled(r.dhcp_enabled);
  // DHCP covers both families; otherwise the families of the addresses given.
  p->set_protocol_if_type(r.dhcp_enabled || (v4 && v6) ? kProtocolBoth : v6 ? kProtocolIpv6 : kProtocolIpv4);
}

// Checks the request's adapters: the value rules (field named by its index
// in the request), then that each names a NIC of `vm` by its MAC. Returns
// them with the MAC in lower case.
Result<std::vector<FailoverNetworkAdapterSettings>> CheckAdapters(const VmRecord& vm,
                                                                  const v1::FailoverNetworkRequest& req) {
  if (req.adapters().empty()) {
    return Status::InvalidArgument("FailoverNetworkAdapterSettings: at least one adapter is required");
  }
  std::vector<FailoverNetworkAdapterSettings> adapters;
  for (int i = 0; i < req.adapters_size(); ++i) {
    const v1::NetworkAdapterSettings& p = req.adapters(i);
    const std::string f = "FailoverNetworkAdapterSettings[" + std::to_string(i) + "].";
    const uint32_t t = p.protocol_if_type();
    if (t != 0 && t != kProtocolIpv4 && t != kProtocolIpv6 && t != kProtocolBoth) {
      return Status::InvalidArgument(f + "ProtocolIFType: " + std::to_string(t) +
                                     " is not 4096 (IPv4), 4097 (IPv6) or 4098 (both)");
    }
    for (const auto& [name, size] : {std::pair<const char*, int>{"IPAddresses", p.ip_addresses_size()},
                                     {"Subnets", p.subnets_size()},
                                     {"DNSServers", p.dns_servers_size()}}) {
      if (size > kMaxAddressesPerList) {
        return Status::InvalidArgument(f + name + "[" + std::to_string(kMaxAddressesPerList) + "]: at most " +
                                       std::to_string(kMaxAddressesPerList));
      }
    }
    if (p.ip_addresses().empty() && !p.dhcp_enabled() && !p.dns_servers().empty()) {
      return Status::InvalidArgument(f +
                                     "DNSServers: needs IPAddresses or DHCPEnabled (an adapter with neither "
                                     "removes its settings)");
    }
    adapters.push_back(FromProto(p));
  }
  VMR_RETURN_IF_ERROR(ValidateFailoverNetworkSettings(adapters));

  auto j = nlohmann::json::parse(vm.definition_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption("VM " + vm.name + ": its stored definition is not JSON");
  auto def = VmDefinition::FromJson(j);
  if (!def.ok()) {
    return Status::FailedPrecondition("VM " + vm.name + ": its stored definition cannot be read (" +
                                      def.status().message() + ")");
  }
  std::string macs;
  for (const VmNicSpec& n : def->nics) macs += (macs.empty() ? "" : ", ") + LowerAscii(n.mac);
  for (size_t i = 0; i < adapters.size(); ++i) {
    const std::string mac = LowerAscii(adapters[i].adapter);
    bool known = std::any_of(def->nics.begin(), def->nics.end(),
                             [&](const VmNicSpec& n) { return LowerAscii(n.mac) == mac; });
    if (!known) {
      return Status::InvalidArgument(
          "FailoverNetworkAdapterSettings[" + std::to_string(i) + "].Adapter: \"" + adapters[i].adapter +
          "\" is not the MAC address of a network adapter of VM " + vm.name +
          (macs.empty() ? " (its definition has no network adapters)" : " (its adapters: " + macs + ")"));
    }
    adapters[i].adapter = mac;
  }
  return adapters;
}

}  // namespace

grpc::Status ControlService::SetFailoverNetworkAdapterSettings(grpc::ServerContext* ctx,
                                                               const v1::FailoverNetworkRequest* req,
                                                               v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "SetFailoverNetworkAdapterSettings", r)) return grpc::Status::OK;
  auto vm = FindNetworkVm(env_->catalog, req->vm());
  if (!vm.ok()) return Answer(r, vm.status());
  auto adapters = CheckAdapters(*vm, *req);
  if (!adapters.ok()) return Answer(r, adapters.status());

  // Merge into the stored set in one transaction: an adapter named here
  // replaces its earlier settings in place (or is appended, or removed).
  Status s = env_->catalog->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(std::vector<FailoverNetworkRecord> stored,
                         env_->catalog->GetFailoverNetworkSettings(vm->id));
    for (const FailoverNetworkAdapterSettings& a : *adapters) {
      auto it = std::find_if(stored.begin(), stored.end(),
                             [&](const FailoverNetworkRecord& x) { return x.adapter == a.adapter; });
      if (a.ip_addresses.empty() && !a.dhcp_enabled) {
        if (it != stored.end()) stored.erase(it);
        continue;
      }
      FailoverNetworkRecord rec{vm->id, a.adapter, a.ip_addresses, a.subnets, a.default_gateways, a.dns_servers,
                                a.dhcp_enabled};
      if (it != stored.end()) {
        *it = std::move(rec);
      } else {
        stored.push_back(std::move(rec));
      }
    }
    return env_->catalog->PutFailoverNetworkSettings(vm->id, stored);
  });
  if (s.ok()) {
    spdlog::info("failover network settings of VM {} ({}) set for {} adapter(s)", vm->name, vm->id,
                 adapters->size());
  }
  return Answer(r, s);
}

grpc::Status ControlService::GetFailoverNetworkAdapterSettings(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                                               v1::FailoverNetworkResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetFailoverNetworkAdapterSettings", r)) return grpc::Status::OK;
  auto vm = FindNetworkVm(env_->catalog, req->vm());
  if (!vm.ok()) return Answer(r, vm.status());
  auto stored = env_->catalog->GetFailoverNetworkSettings(vm->id);
  if (!stored.ok()) return Answer(r, stored.status());
  resp->set_vm_id(vm->id);
  for (const FailoverNetworkRecord& rec : *stored) ToProto(rec, resp->add_adapters());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- failover (replica host)

namespace {
Status NoFailover() { return Status::NotSupported("this daemon runs without the failover service"); }
}  // namespace

grpc::Status ControlService::InitiateFailover(grpc::ServerContext* ctx, const v1::FailoverRequest* req,
                                              v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "InitiateFailover", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  if (req->test_network() != 0 || req->apply_network_settings()) {
    return Answer(r, Status::InvalidArgument("test_network / apply_network_settings: only for TestReplicaSystem"));
  }
  FailoverRequestParams p;
  p.vm = req->vm();
  p.point_id = req->recovery_point_id();
  p.force = req->force();
  p.start_vm = req->start_vm();
  auto job = env_->failover->InitiateFailover(p);
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::RevertFailover(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                            v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RevertFailover", r)) return grpc::Status::OK;
  // A primary in 4 cancels its planned failover (the engine); a replica
  // reverts its failover (the FailoverManager).
  if (env_->replication) {
    auto vm = env_->replication->ResolveVm(req->vm());
    if (vm.ok() && vm->mode == ReplicationMode::kPrimary) {
      auto job = env_->replication->RevertPlannedFailover(vm->id);
      if (!job.ok()) return Answer(r, job.status());
      SetJobStarted(r, *job);
      return grpc::Status::OK;
    }
  }
  if (!env_->failover) return Answer(r, NoFailover());
  auto job = env_->failover->RevertFailover(req->vm());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::StartVm(grpc::ServerContext* ctx, const v1::VmRequest* req, v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "StartVm", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  return Answer(r, env_->failover->StartVm(req->vm()));
}

grpc::Status ControlService::CommitFailover(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                            v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "CommitFailover", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  auto job = env_->failover->CommitFailover(req->vm());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::TestReplicaSystem(grpc::ServerContext* ctx, const v1::FailoverRequest* req,
                                               v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "TestReplicaSystem", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  if (req->force()) return Answer(r, Status::InvalidArgument("force: only for InitiateFailover"));
  TestFailoverParams p;
  p.vm = req->vm();
  p.point_id = req->recovery_point_id();
  p.start_vm = req->start_vm();
  switch (req->test_network()) {
    case 0:
    case 2:
      p.network = TestNetwork::kIsolated;
      break;
    case 1:
      p.network = TestNetwork::kNone;
      break;
    default:
      return Answer(r, Status::InvalidArgument("test_network: " + std::to_string(req->test_network()) +
                                               " is not 1 (none) or 2 (isolated)"));
  }
  p.apply_network_settings = req->apply_network_settings();
  auto job = env_->failover->TestReplicaSystem(p);
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::DestroySystem(grpc::ServerContext* ctx, const v1::VmRequest* req,
                                           v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "DestroySystem", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  auto job = env_->failover->DestroySystem(req->vm());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::ImportInitialReplica(grpc::ServerContext* ctx, const v1::ImportInitialReplicaRequest* req,
                                                  v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ImportInitialReplica", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  auto job = env_->failover->ImportInitialReplica(req->vm(), req->initial_replication_import_location());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- not yet

namespace {

// Methods whose capability is not built yet still check what they can: the
// VM (32779 when unknown), its relationship and the state table (32775 in a
// state the method is not allowed from); only a call that would be allowed
// answers 32770 (not supported).
Status CheckStateOfMissingMethod(Catalog* catalog, const std::string& vm_name, int index, Operation op) {
  if (index != 0 && index != 1) return Status::InvalidArgument("RelationshipIndex: 0 or 1");
  VMR_ASSIGN_OR_RETURN(VmRecord vm, FindNetworkVm(catalog, vm_name));
  VMR_ASSIGN_OR_RETURN(auto rel, catalog->GetRelationship(vm.id, index));
  if (!rel) return Status::FailedPrecondition("VM " + vm.name + " has no replication relationship");
  VMR_ASSIGN_OR_RETURN(TableMode mode, TableModeFor(vm.mode, index));
  VMR_RETURN_IF_ERROR(CheckTransition(mode, rel->state, op).status());
  return Status::NotSupported(std::string(Name(op)) + " is not supported by this vmreplica build yet (" +
                              kFailoverCapability + "; docs/failover.md sections 7-18 specify it)");
}

}  // namespace

grpc::Status ControlService::ReverseReplicationRelationship(grpc::ServerContext* ctx,
                                                            const v1::VmSettingsRequest* req,
                                                            v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ReverseReplicationRelationship", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  // The VM and its table first (32779, 32775), as every method.
  if (Status s = CheckStateOfMissingMethod(env_->catalog, req->vm(), 0, Operation::kReverseReplicationRelationship);
      s.code() != Code::kNotSupported) {
    return Answer(r, s);
  }
  auto settings = FromProto(req->settings());
  if (!settings.ok()) return Answer(r, settings.status());
  auto job = env_->failover->ReverseReplicationRelationship(req->vm(), *settings);
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::InitiateFailback(grpc::ServerContext* ctx, const v1::FailbackRequest* req,
                                              v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "InitiateFailback", r)) return grpc::Status::OK;
  if (!env_->failover) return Answer(r, NoFailover());
  if (Status s = CheckStateOfMissingMethod(env_->catalog, req->vm(), 0, Operation::kInitiateFailback);
      s.code() != Code::kNotSupported) {
    return Answer(r, s);
  }
  auto settings = FromProto(req->settings());
  if (!settings.ok()) return Answer(r, settings.status());
  auto job = env_->failover->InitiateFailback(req->vm(), *settings, req->recovery_point_id());
  if (!job.ok()) return Answer(r, job.status());
  SetJobStarted(r, *job);
  return grpc::Status::OK;
}

grpc::Status ControlService::ChangeReplicationModeToPrimary(grpc::ServerContext* ctx,
                                                            const v1::VmRelationshipRequest* req,
                                                            v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ChangeReplicationModeToPrimary", r)) return grpc::Status::OK;
  return Answer(r, CheckStateOfMissingMethod(env_->catalog, req->vm(), static_cast<int>(req->relationship_index()),
                                             Operation::kChangeReplicationModeToPrimary));
}

}  // namespace vmreplica::service
