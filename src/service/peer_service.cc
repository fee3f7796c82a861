#include "service/peer_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "service/authorization.h"
#include "service/convert.h"
#include "service/tls.h"

namespace vmreplica::service {

grpc::Status PeerService::Hello(grpc::ServerContext* context, const v1::HelloRequest* request,
                                v1::HelloResponse* response) {
  std::vector<std::string> names = PeerNames(*context);
  response->set_host_name(env_->host_name);
  for (const auto& n : names) response->add_peer_names(n);
  if (request->protocol_version() == 0) {
    response->set_message("protocol version 0 is not a version");
    return grpc::Status::OK;
  }
  response->set_protocol_version(std::min(request->protocol_version(), kProtocolVersion));
  std::vector<std::string> ours = kFeatures;
  if (replicas_ != nullptr) ours.push_back(kDeltaFeature);
  if (reverse_ != nullptr) ours.push_back(kReverseFeature);
  for (const auto& f : request->features()) {
    if (std::find(ours.begin(), ours.end(), f) != ours.end()) response->add_features(f);
  }

  auto settings = env_->catalog->GetServerSettings();
  auto entries = env_->catalog->ListAuthorizationEntries();
  if (!settings.ok() || !entries.ok()) {
    Status s = settings.ok() ? entries.status() : settings.status();
    spdlog::error("hello from {}: catalog: {}", fmt::join(names, ","), s.ToString());
    return grpc::Status(grpc::StatusCode::INTERNAL, "replica catalog unavailable");
  }
  response->set_recovery_server_enabled(settings->recovery_server_enabled);
  response->set_allowed_authentication_type(Number(settings->allowed_authentication_type));

  const auto allowed = settings->allowed_authentication_type;
  const bool certificates_allowed = allowed == AllowedAuthenticationType::kCertificate ||
                                    allowed == AllowedAuthenticationType::kKerberosAndCertificate;
  auto match = FindAuthorization(*entries, names);
  if (!settings->recovery_server_enabled) {
    response->set_message(env_->host_name + " is not configured as a replica server (RecoveryServerEnabled is off)");
  } else if (!certificates_allowed) {
    response->set_message(env_->host_name + " does not accept certificate authentication (AllowedAuthenticationType " +
                          std::string(Name(allowed)) + ")");
  } else if (!match) {
    response->set_message(
        "no authorization entry on " + env_->host_name + " matches " +
        (names.empty() ? std::string("(no certificate names)") : fmt::format("{}", fmt::join(names, ", "))));
  } else {
    response->set_authorized(true);
    response->set_authorized_by(match->allowed_primary_host_system);
    response->set_trust_group(match->trust_group);
  }
  spdlog::info("hello from {}: authorized={} {}", fmt::join(names, ","), response->authorized(),
               response->authorized() ? "by " + response->authorized_by() : response->message());
  return grpc::Status::OK;
}

Result<PrimaryCaller> PeerService::Authorize(const grpc::ServerContext& context) {
  PrimaryCaller caller;
  caller.names = PeerNames(context);
  if (caller.names.empty()) return Status::PermissionDenied("the call did not come with a client certificate");
  VMR_ASSIGN_OR_RETURN(auto settings, env_->catalog->GetServerSettings());
  if (!settings.recovery_server_enabled) {
    return Status::PermissionDenied(env_->host_name + " is not configured as a replica server");
  }
  const auto allowed = settings.allowed_authentication_type;
  if (allowed != AllowedAuthenticationType::kCertificate &&
      allowed != AllowedAuthenticationType::kKerberosAndCertificate) {
    return Status::PermissionDenied(env_->host_name + " does not accept certificate authentication");
  }
  VMR_ASSIGN_OR_RETURN(auto entries, env_->catalog->ListAuthorizationEntries());
  auto match = FindAuthorization(entries, caller.names);
  if (!match) {
    return Status::PermissionDenied(
        fmt::format("no authorization entry on {} matches {}", env_->host_name, fmt::join(caller.names, ", ")));
  }
  caller.entry = *match;
  return caller;
}

namespace {

void ToProto(const ReplicaStatusInfo& s, v1::ReplicaStatus* p) {
  p->set_expected_sequence(s.expected_sequence);
  p->set_latest_applied(s.latest_applied);
  p->set_state(Number(s.state));
  p->set_last_apply_time_unix_ms(s.last_apply_ms);
  p->set_partial_sequence(s.partial_sequence);
  p->set_partial_chunks(s.partial_chunks);
  if (s.latest_generation) {
    p->set_latest_generation(std::string(s.latest_generation->begin(), s.latest_generation->end()));
  }
}

grpc::Status Refuse(const char* method, const std::vector<std::string>& names, const Status& s) {
  spdlog::warn("{} from {}: {}", method, fmt::join(names, ","), s.ToString());
  return StatusToGrpc(s);
}

class GrpcDeltaStream final : public DeltaStream {
 public:
  explicit GrpcDeltaStream(grpc::ServerReaderWriter<v1::DeltaReply, v1::DeltaMessage>* s) : s_(s) {}
  bool Read(v1::DeltaMessage* m) override { return s_->Read(m); }
  bool Write(const v1::DeltaReply& r) override { return s_->Write(r); }

 private:
  grpc::ServerReaderWriter<v1::DeltaReply, v1::DeltaMessage>* s_;
};

}  // namespace

grpc::Status PeerService::CreateReplica(grpc::ServerContext* context, const v1::CreateReplicaRequest* request,
                                        v1::ReplicaStatus* response) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("CreateReplica", PeerNames(*context), caller.status());
  if (request->relationship_index() != 0) {
    return Refuse("CreateReplica", caller->names, Status::InvalidArgument("only relationship 0 can be created"));
  }
  CreateReplicaParams p;
  p.vm_id = request->vm_id();
  p.vm_name = request->vm_name();
  p.definition_json = request->definition_json();
  for (const auto& d : request->disks()) p.disks.push_back(ReplicaDisk{d.name(), d.size_bytes()});
  auto settings = FromProto(request->settings());
  if (!settings.ok()) return Refuse("CreateReplica", caller->names, settings.status());
  p.settings = *settings;
  if (request->primary_address().size() > 262) {
    return Refuse("CreateReplica", caller->names, Status::InvalidArgument("primary_address over 262 bytes"));
  }
  p.settings.primary_connection_point = request->primary_address();
  auto r = replicas_->CreateReplica(*caller, p);
  if (!r.ok()) return Refuse("CreateReplica", caller->names, r.status());
  ToProto(*r, response);
  return grpc::Status::OK;
}

grpc::Status PeerService::GetReplicaStatus(grpc::ServerContext* context, const v1::ReplicaRef* request,
                                           v1::ReplicaStatus* response) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("GetReplicaStatus", PeerNames(*context), caller.status());
  auto r = replicas_->GetReplicaStatus(*caller, request->vm_id(), request->relationship_index());
  if (!r.ok()) return Refuse("GetReplicaStatus", caller->names, r.status());
  ToProto(*r, response);
  return grpc::Status::OK;
}

grpc::Status PeerService::RemoveReplica(grpc::ServerContext* context, const v1::ReplicaRef* request,
                                        v1::RemoveReplicaResponse*) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("RemoveReplica", PeerNames(*context), caller.status());
  Status s = replicas_->RemoveReplica(*caller, request->vm_id(), request->relationship_index());
  if (!s.ok()) return Refuse("RemoveReplica", caller->names, s);
  return grpc::Status::OK;
}

grpc::Status PeerService::ModifyReplica(grpc::ServerContext* context, const v1::ModifyReplicaRequest* request,
                                        v1::ReplicaStatus* response) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("ModifyReplica", PeerNames(*context), caller.status());
  auto settings = FromProto(request->settings());
  if (!settings.ok()) return Refuse("ModifyReplica", caller->names, settings.status());
  auto r = replicas_->ModifyReplica(*caller, request->vm_id(), request->relationship_index(), *settings);
  if (!r.ok()) return Refuse("ModifyReplica", caller->names, r.status());
  ToProto(*r, response);
  return grpc::Status::OK;
}

grpc::Status PeerService::GetPrimaryVmState(grpc::ServerContext* context, const v1::PrimaryVmQuery* request,
                                            v1::PrimaryVmState* response) {
  const std::vector<std::string> names = PeerNames(*context);
  if (names.empty()) {
    return Refuse("GetPrimaryVmState", names, Status::PermissionDenied("the call did not come with a client certificate"));
  }
  if (env_->replication == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no replication engine");
  auto st = env_->replication->QueryPrimaryRunState(names, request->vm_id());
  if (!st.ok()) return Refuse("GetPrimaryVmState", names, st.status());
  response->set_run_state(static_cast<uint32_t>(st->run_state));
  response->set_replication_state(static_cast<uint32_t>(st->state));
  response->set_detail(st->detail);
  spdlog::info("GetPrimaryVmState from {}: VM {}: run state {} ({})", fmt::join(names, ","), request->vm_id(),
               st->run_state, st->detail);
  return grpc::Status::OK;
}

grpc::Status PeerService::ReserveImport(grpc::ServerContext* context, const v1::ReserveImportRequest* request,
                                        v1::ReplicaStatus* response) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("ReserveImport", PeerNames(*context), caller.status());
  std::string hex;
  if (!request->release()) {
    if (request->generation().size() != 16) {
      return Refuse("ReserveImport", caller->names, Status::InvalidArgument("generation: must be 16 bytes"));
    }
    static constexpr char kDigits[] = "0123456789abcdef";
    for (unsigned char c : request->generation()) {
      hex.push_back(kDigits[c >> 4]);
      hex.push_back(kDigits[c & 15]);
    }
  }
  auto r = replicas_->ReserveImport(*caller, request->vm_id(), request->relationship_index(), hex,
                                    request->release());
  if (!r.ok()) return Refuse("ReserveImport", caller->names, r.status());
  ToProto(*r, response);
  return grpc::Status::OK;
}

grpc::Status PeerService::GetBlockHashes(grpc::ServerContext* context, const v1::BlockHashRequest* request,
                                         grpc::ServerWriter<v1::BlockHashPiece>* writer) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("GetBlockHashes", PeerNames(*context), caller.status());
  constexpr size_t kPiece = 4u << 20;
  const bool windows = request->window_blocks() != 0;
  Status s = replicas_->HashDisks(
      *caller, request->vm_id(), request->relationship_index(), request->block_size(), request->window_blocks(),
      [&](uint32_t disk, bool last, const std::string& serialized) {
        size_t at = 0;
        do {
          v1::BlockHashPiece piece;
          piece.set_disk(disk);
          const size_t n = std::min(kPiece, serialized.size() - at);
          piece.set_data(serialized.substr(at, n));
          at += n;
          piece.set_end_of_run(windows && at == serialized.size());
          piece.set_end_of_disk(last && at == serialized.size());
          if (!writer->Write(piece)) return false;
        } while (at < serialized.size());
        return true;
      });
  if (!s.ok()) return Refuse("GetBlockHashes", caller->names, s);
  return grpc::Status::OK;
}

grpc::Status PeerService::GetRangeHashes(grpc::ServerContext* context, const v1::RangeHashRequest* request,
                                         grpc::ServerWriter<v1::BlockHashPiece>* writer) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("GetRangeHashes", PeerNames(*context), caller.status());
  constexpr size_t kPiece = 4u << 20;
  Status s = replicas_->HashRanges(
      *caller, request->vm_id(), request->relationship_index(), request->block_size(), request->ranges(),
      request->all_blocks(), [&](uint32_t disk, uint64_t, bool last_run_of_disk, const std::string& serialized) {
        size_t at = 0;
        do {
          v1::BlockHashPiece piece;
          piece.set_disk(disk);
          const size_t n = std::min(kPiece, serialized.size() - at);
          piece.set_data(serialized.substr(at, n));
          at += n;
          piece.set_end_of_run(at == serialized.size());
          piece.set_end_of_disk(at == serialized.size() && last_run_of_disk);
          if (!writer->Write(piece)) return false;
        } while (at < serialized.size());
        return true;
      });
  if (!s.ok()) return Refuse("GetRangeHashes", caller->names, s);
  return grpc::Status::OK;
}

grpc::Status PeerService::PushDelta(grpc::ServerContext* context,
                                    grpc::ServerReaderWriter<v1::DeltaReply, v1::DeltaMessage>* stream) {
  if (replicas_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no data plane on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("PushDelta", PeerNames(*context), caller.status());
  GrpcDeltaStream ds(stream);
  Status s = replicas_->ReceiveDelta(*caller, ds);
  if (!s.ok()) return Refuse("PushDelta", caller->names, s);
  return grpc::Status::OK;
}

grpc::Status PeerService::PrepareReverse(grpc::ServerContext* context, const v1::PrepareReverseRequest* request,
                                         v1::PrepareReverseResponse* response) {
  if (reverse_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no reverse on this host");
  auto caller = Authorize(*context);
  if (!caller.ok()) return Refuse("PrepareReverse", PeerNames(*context), caller.status());
  PrepareReverseParams p;
  p.vm_id = request->vm_id();
  p.request_id = request->request_id();
  p.purpose = request->purpose();
  p.vm_name = request->vm_name();
  if (request->disks_size() > 64) {
    return Refuse("PrepareReverse", caller->names, Status::InvalidArgument("disks: more than 64"));
  }
  for (const auto& d : request->disks()) p.disks.push_back(ReplicaDisk{d.name(), d.size_bytes()});
  auto settings = FromProto(request->settings());
  if (!settings.ok()) return Refuse("PrepareReverse", caller->names, settings.status());
  p.settings = *settings;
  p.primary_address = request->primary_address();
  auto a = reverse_->PrepareReverse(caller->names, caller->entry, p);
  if (!a.ok()) return Refuse("PrepareReverse", caller->names, a.status());
  response->set_phase(a->done ? 2 : 1);
  response->set_job_id(a->job_id);
  if (a->done) {
    response->set_generation(std::string(a->claim.generation.begin(), a->claim.generation.end()));
    response->set_common_sequence(a->claim.common_sequence);
    response->set_tracking(a->claim.tracking_intact ? 1 : 2);
    response->set_candidate_bytes(a->claim.candidate_bytes);
    response->set_local_copy_bytes(a->claim.local_copy_bytes);
    ToProto(a->status, response->mutable_status());
  }
  return grpc::Status::OK;
}

}  // namespace vmreplica::service
