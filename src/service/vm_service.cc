#include "service/vm_service.h"

#include <spdlog/spdlog.h>

#include "service/admin_auth.h"
#include "service/convert.h"
#include "service/tls.h"
#include "vmreplica/model/return_code.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::service {
namespace {

void SetResult(v1::MethodResult* r, ReturnCode code, const std::string& description = "") {
  r->set_return_value(Number(code));
  r->set_error_description(description);
}

grpc::Status Answer(v1::MethodResult* r, const Status& s) {
  if (s.ok()) {
    SetResult(r, ReturnCode::kCompleted);
  } else {
    SetResult(r, ToReturnCode(s), s.message());
  }
  return grpc::Status::OK;
}

void ToProto(const VmRecord& rec, v1::Vm* p) {
  p->set_id(rec.id);
  p->set_name(rec.name);
  p->set_replication_mode(Number(rec.mode));
  p->set_created_unix_ms(rec.created_ms);
  p->set_definition_json(rec.definition_json);
  nlohmann::json j = nlohmann::json::parse(rec.definition_json, nullptr, false);
  auto def = VmDefinition::FromJson(j);
  if (!def.ok()) {
    // A VM stored by another path (a replica) may carry another definition.
    return;
  }
  p->set_kind(static_cast<uint32_t>(def->kind));
  p->set_memory_mib(def->memory_mib);
  p->set_vcpus(def->vcpus);
  for (const auto& d : def->disks) {
    auto* pd = p->add_disks();
    pd->set_name(d.name);
    pd->set_node_name(d.node_name);
    pd->set_path(d.path);
    pd->set_format(d.format);
    pd->set_size_bytes(d.size_bytes);
  }
  for (const auto& n : def->nics) {
    auto* pn = p->add_nics();
    pn->set_mac(n.mac);
    pn->set_model(n.model);
    pn->set_network(n.network);
  }
  p->set_qmp_socket(def->qmp_socket);
  p->set_nbd_socket(def->nbd_socket);
  p->set_qga_socket(def->qga_socket);
  p->set_boot_kernel(def->boot_kernel);
  p->set_boot_initrd(def->boot_initrd);
  p->set_boot_append(def->boot_append);
  p->set_libvirt_uri(def->libvirt_uri);
  p->set_libvirt_domain(def->libvirt_domain);
}

Result<VmAddRequest> FromProto(const v1::AddVmRequest& p) {
  VmAddRequest r;
  if (p.kind() < 1 || p.kind() > 3) {
    return Status::InvalidArgument("kind: " + std::to_string(p.kind()) + " is not 1 (qmp), 2 (libvirt) or 3 (offline)");
  }
  r.kind = static_cast<VmSourceKind>(p.kind());
  r.name = p.name();
  r.uuid = p.uuid();
  r.qmp_socket = p.qmp_socket();
  r.nbd_socket = p.nbd_socket();
  r.qga_socket = p.qga_socket();
  r.boot_kernel = p.boot_kernel();
  r.boot_initrd = p.boot_initrd();
  r.boot_append = p.boot_append();
  if (!p.libvirt_uri().empty()) r.libvirt_uri = p.libvirt_uri();
  r.libvirt_domain = p.libvirt_domain();
  r.memory_mib = p.memory_mib();
  r.vcpus = p.vcpus();
  for (const auto& d : p.disks()) {
    if (r.kind == VmSourceKind::kQmp) {
      r.disk_nodes.emplace_back(d.disk(), d.target());
    } else if (r.kind == VmSourceKind::kOffline) {
      r.disk_images.emplace_back(d.disk(), d.target());
    } else {
      return Status::InvalidArgument("disks: a libvirt VM takes its disks from the domain XML");
    }
  }
  if (r.kind != VmSourceKind::kQmp && !r.qmp_socket.empty()) {
    return Status::InvalidArgument("qmp_socket: only for kind 1 (qmp)");
  }
  if (r.kind != VmSourceKind::kQmp && !r.nbd_socket.empty()) {
    return Status::InvalidArgument("nbd_socket: only for kind 1 (qmp)");
  }
  if (r.kind == VmSourceKind::kLibvirt && !(r.boot_kernel.empty() && r.boot_initrd.empty() && r.boot_append.empty())) {
    return Status::InvalidArgument("boot_kernel: a libvirt VM boots as its domain XML says");
  }
  if (r.kind != VmSourceKind::kQmp && !r.qga_socket.empty()) {
    return Status::InvalidArgument("qga_socket: only for kind 1 (qmp); libvirt names the agent's channel itself");
  }
  return r;
}

// The VM named by `vm`: a UUID (the catalog id) or a name.
Result<VmRecord> FindVm(Catalog* catalog, const std::string& vm) {
  if (vm.empty()) return Status::InvalidArgument("vm: a name or UUID is required");
  VMR_ASSIGN_OR_RETURN(auto by_id, catalog->GetVm(vm));
  if (by_id.has_value()) return *by_id;
  auto by_name = catalog->FindVmByName(vm);
  if (!by_name.ok()) {
    if (by_name.status().code() == Code::kFailedPrecondition) {
      return Status::InvalidArgument("vm: several VMs are named \"" + vm + "\"; use the UUID");
    }
    return by_name.status();
  }
  if (!by_name->has_value()) return Status::NotFound("no VM \"" + vm + "\"");
  return **by_name;
}

}  // namespace

bool VmService::Authorize(const grpc::ServerContext& context, const char* method,
                       v1::MethodResult* result) const {
  return AuthorizeAdmin(*env_, remote_, context, method, result);
}

grpc::Status VmService::AddVm(grpc::ServerContext* ctx, const v1::AddVmRequest* req, v1::VmResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "AddVm", r)) return grpc::Status::OK;
  auto request = FromProto(*req);
  if (!request.ok()) return Answer(r, request.status());
  // QEMU / libvirt first, outside the catalog transaction.
  auto def = InspectVm(*request);
  if (!def.ok()) return Answer(r, def.status());
  VmRecord record = ToVmRecord(*def);
  record.created_ms = NowMs();
  Status s = env_->catalog->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto existing, env_->catalog->GetVm(record.id));
    if (existing.has_value()) {
      return Status::AlreadyExists("a VM with uuid " + record.id + " (" + existing->name +
                                   ") is already bound; remove it first");
    }
    auto same_name = env_->catalog->FindVmByName(record.name);
    if (!same_name.ok() || same_name->has_value()) {
      return Status::AlreadyExists("a VM named \"" + record.name + "\" is already bound");
    }
    VMR_RETURN_IF_ERROR(env_->catalog->PutVm(record));
    return env_->catalog->PutDisks(record.id, ToDiskRecords(*def));
  });
  if (!s.ok()) return Answer(r, s);
  spdlog::info("VM {} ({}) bound ({} disks, {})", record.name, record.id, def->disks.size(),
               VmSourceKindName(def->kind));
  auto stored = env_->catalog->GetVm(record.id);
  if (stored.ok() && stored->has_value()) record = **stored;
  ToProto(record, resp->mutable_vm());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status VmService::GetVm(grpc::ServerContext* ctx, const v1::VmRequest* req, v1::VmResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "GetVm", r)) return grpc::Status::OK;
  auto vm = FindVm(env_->catalog, req->vm());
  if (!vm.ok()) return Answer(r, vm.status());
  ToProto(*vm, resp->mutable_vm());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status VmService::ListVms(grpc::ServerContext* ctx, const v1::Empty*, v1::VmsResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "ListVms", r)) return grpc::Status::OK;
  auto vms = env_->catalog->ListVms();
  if (!vms.ok()) return Answer(r, vms.status());
  for (const auto& vm : *vms) ToProto(vm, resp->add_vms());
  SetResult(r, ReturnCode::kCompleted);
  return grpc::Status::OK;
}

grpc::Status VmService::RemoveVm(grpc::ServerContext* ctx, const v1::VmRequest* req, v1::MethodResponse* resp) {
  auto* r = resp->mutable_result();
  if (!Authorize(*ctx, "RemoveVm", r)) return grpc::Status::OK;
  Status s = env_->catalog->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(VmRecord vm, FindVm(env_->catalog, req->vm()));
    for (int index = 0; index < 2; ++index) {
      VMR_ASSIGN_OR_RETURN(auto rel, env_->catalog->GetRelationship(vm.id, index));
      if (rel.has_value()) {
        return Status::FailedPrecondition("VM " + vm.name + " has a replication relationship (index " +
                                          std::to_string(index) + "); remove it first");
      }
    }
    VMR_RETURN_IF_ERROR(env_->catalog->DeleteVm(vm.id));
    spdlog::info("VM {} ({}) removed from the inventory", vm.name, vm.id);
    return Status::Ok();
  });
  return Answer(r, s);
}

}  // namespace vmreplica::service
