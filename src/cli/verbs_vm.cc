// vm add | list | get | remove: the VM inventory (proto/vmreplica/vm.proto).
// These verbs speak to the daemon's VmInventory service over the same
// connection options as every other verb.
#include <grpcpp/grpcpp.h>

#include "cli/connection.h"
#include "cli/format.h"
#include "cli/session.h"
#include "cli/verbs.h"
#include "vmreplica/vm.grpc.pb.h"

namespace vmreplica::cli {
namespace {

const char* KindName(uint32_t kind) {
  switch (kind) {
    case 1:
      return "qmp";
    case 2:
      return "libvirt";
    case 3:
      return "offline";
  }
  return "unknown";
}

// Calls one VmInventory RPC; prints transport failures like the session does.
template <typename Req, typename Resp>
int CallVm(Session& s, const char* name,
           grpc::Status (v1::VmInventory::Stub::*method)(grpc::ClientContext*, const Req&, Resp*), const Req& request,
           Resp* response) {
  auto channel = OpenChannel(s.options().connection);
  if (!channel.ok()) {
    return s.Error(channel.status().message(),
                   channel.status().code() == Code::kInvalidArgument ? kExitUsage : kExitFailed);
  }
  auto stub = v1::VmInventory::NewStub(*channel);
  grpc::ClientContext context;
  // AddVm talks to QEMU / libvirt: give it time, but not forever.
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(2));
  grpc::Status status = (stub.get()->*method)(&context, request, response);
  if (status.ok()) return kExitOk;
  if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    return s.Error(std::string(name) + ": this vmreplicad does not serve the VM inventory", kExitFailed);
  }
  return s.Error(
      "cannot reach vmreplicad at " + TargetDescription(s.options().connection) + ": " + status.error_message(),
      kExitUnreachable);
}

void PrintVm(Session& s, const v1::Vm& vm) {
  PropertyTable t;
  t.Add("Name", vm.name())
      .Add("Id", vm.id())
      .Add("Kind", KindName(vm.kind()))
      .Add("MemoryMiB", std::to_string(vm.memory_mib()))
      .Add("ProcessorCount", std::to_string(vm.vcpus()))
      .Add("ReplicationMode", NumberAndName<ReplicationMode>(vm.replication_mode()));
  if (vm.kind() == 1) t.Add("QmpSocket", vm.qmp_socket());
  if (vm.kind() == 1 && !vm.nbd_socket().empty()) t.Add("NbdSocket", vm.nbd_socket());
  if (vm.kind() == 1 && !vm.qga_socket().empty()) t.Add("GuestAgentSocket", vm.qga_socket());
  if (!vm.boot_kernel().empty()) {
    t.Add("BootKernel", vm.boot_kernel());
    if (!vm.boot_initrd().empty()) t.Add("BootInitrd", vm.boot_initrd());
    if (!vm.boot_append().empty()) t.Add("BootAppend", vm.boot_append());
  }
  if (vm.kind() == 2) t.Add("LibvirtUri", vm.libvirt_uri()).Add("LibvirtDomain", vm.libvirt_domain());
  s.out() << t.Render();
  Table disks({"Disk", "Node", "Format", "Size", "Path"});
  for (const auto& d : vm.disks()) {
    disks.AddRow({d.name(), d.node_name(), d.format(), FormatBytes(d.size_bytes()), d.path()});
  }
  s.out() << "\n" << disks.Render();
  if (vm.nics_size() > 0) {
    Table nics({"Mac", "Model", "Network"});
    for (const auto& n : vm.nics()) nics.AddRow({n.mac(), n.model(), n.network()});
    s.out() << "\n" << nics.Render();
  }
}

// "vda=NODE" -> DiskBinding.
Status ParseBinding(const std::string& text) {
  auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    return Status::InvalidArgument("expected DISK=VALUE, e.g. vda=drive0");
  }
  return Status::Ok();
}

struct AddOptions {
  std::string name, uuid, qmp, nbd, qga, kernel, initrd, append, libvirt, uri = "qemu:///system";
  std::vector<std::string> disks, images;
  uint64_t memory = 0;
  uint32_t vcpus = 0;
  CLI::Option *o_qmp, *o_libvirt, *o_images;
};

int Add(Session& s, const AddOptions& o) {
  v1::AddVmRequest req;
  req.set_name(o.name);
  req.set_uuid(o.uuid);
  req.set_memory_mib(o.memory);
  req.set_vcpus(o.vcpus);
  req.set_boot_kernel(o.kernel);
  req.set_boot_initrd(o.initrd);
  req.set_boot_append(o.append);
  const std::vector<std::string>* bindings = nullptr;
  if (o.o_qmp->count() > 0) {
    req.set_kind(1);
    req.set_qmp_socket(o.qmp);
    req.set_nbd_socket(o.nbd);
    req.set_qga_socket(o.qga);
    bindings = &o.disks;
    if (o.disks.empty()) return s.Error("vm add --qmp needs at least one --disk DISK=NODE", kExitUsage);
  } else if (o.o_libvirt->count() > 0) {
    req.set_kind(2);
    req.set_libvirt_domain(o.libvirt);
    req.set_libvirt_uri(o.uri);
  } else if (o.o_images->count() > 0) {
    req.set_kind(3);
    bindings = &o.images;
  } else {
    return s.Error("vm add: give one of --qmp SOCKET, --libvirt DOMAIN or --image DISK=FILE", kExitUsage);
  }
  if (bindings != nullptr) {
    for (const auto& b : *bindings) {
      auto eq = b.find('=');
      auto* d = req.add_disks();
      d->set_disk(b.substr(0, eq));
      d->set_target(b.substr(eq + 1));
    }
  }
  v1::VmResponse resp;
  if (int rc = CallVm(s, "AddVm", &v1::VmInventory::Stub::AddVm, req, &resp); rc != kExitOk) return rc;
  if (s.json()) s.PrintJson(resp);
  return s.HandleResult("AddVm", resp.result(), [&] { PrintVm(s, resp.vm()); });
}

}  // namespace

void AddVmVerbs(Registry& reg) {
  reg.Group("vm", "the VM inventory: bind a VM (QEMU monitor, libvirt domain or offline images) to vmreplicad");

  auto o = std::make_shared<AddOptions>();
  CLI::App* add = reg.Add("vm add", "inspect a VM and store its definition (AddVm)", {"AddVm"},
                          [o](Session& s) { return Add(s, *o); });
  add->add_option("NAME", o->name, "the VM's name (libvirt: defaults to the domain)");
  add->add_option("--uuid", o->uuid, "the VM's UUID (default: from QEMU/libvirt, else generated)");
  o->o_qmp = add->add_option("--qmp", o->qmp, "QMP unix socket of a running QEMU");
  add->add_option("--disk", o->disks, "with --qmp: DISK=NODE, the format node the guest writes through (repeat)")
      ->check(StatusValidator(ParseBinding, "DISK=NODE"))
      ->needs(o->o_qmp);
  add->add_option("--nbd-socket", o->nbd,
                  "with --qmp: the unix socket of an NBD server that QEMU already runs (e.g. qemu-storage-daemon "
                  "--nbd-server); vmreplica adds its exports there")
      ->needs(o->o_qmp);
  add->add_option("--kernel", o->kernel,
                  "direct kernel boot: the VM does not boot from its disks; a failover VM boots with this kernel");
  add->add_option("--initrd", o->initrd, "with --kernel: the initial ramdisk");
  add->add_option("--append", o->append, "with --kernel: the kernel command line");
  add->add_option("--qga-socket", o->qga,
                  "with --qmp: the host end of the VM's guest-agent channel (a chardev socket of a virtserialport "
                  "named org.qemu.guest_agent.0); needed for application-consistent recovery points")
      ->needs(o->o_qmp);
  o->o_libvirt = add->add_option("--libvirt", o->libvirt, "a libvirt domain name")->excludes(o->o_qmp);
  add->add_option("--uri", o->uri, "with --libvirt: the libvirt connection URI (default qemu:///system)")
      ->needs(o->o_libvirt);
  o->o_images = add->add_option("--image", o->images, "offline VM: DISK=IMAGE-FILE, qcow2 or raw (repeat)")
                    ->check(StatusValidator(ParseBinding, "DISK=FILE"))
                    ->excludes(o->o_qmp)
                    ->excludes(o->o_libvirt);
  add->add_option("--memory", o->memory, "memory in MiB, when QEMU cannot tell (offline: required)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{16} << 20));
  add->add_option("--vcpus", o->vcpus, "number of vCPUs, when QEMU cannot tell (offline: required)")
      ->check(CLI::Range(1, 4096));

  reg.Add("vm list", "the VMs bound to this host (ListVms)", {"ListVms"}, [](Session& s) {
    v1::VmsResponse resp;
    if (int rc = CallVm(s, "ListVms", &v1::VmInventory::Stub::ListVms, v1::Empty(), &resp); rc != kExitOk) return rc;
    if (s.json()) s.PrintJson(resp);
    return s.HandleResult("ListVms", resp.result(), [&] {
      Table t({"Name", "Id", "Kind", "Disks", "MemoryMiB", "vCPUs", "ReplicationMode"});
      for (const auto& vm : resp.vms()) {
        t.AddRow({vm.name(), vm.id(), KindName(vm.kind()), std::to_string(vm.disks_size()),
                  std::to_string(vm.memory_mib()), std::to_string(vm.vcpus()),
                  NumberAndName<ReplicationMode>(vm.replication_mode())});
      }
      s.out() << t.Render();
    });
  });

  auto get_name = std::make_shared<std::string>();
  CLI::App* get = reg.Add("vm get", "a VM's stored definition (GetVm)", {"GetVm"}, [get_name](Session& s) {
    v1::VmRequest req;
    req.set_vm(*get_name);
    v1::VmResponse resp;
    if (int rc = CallVm(s, "GetVm", &v1::VmInventory::Stub::GetVm, req, &resp); rc != kExitOk) return rc;
    if (s.json()) s.PrintJson(resp);
    return s.HandleResult("GetVm", resp.result(), [&] { PrintVm(s, resp.vm()); });
  });
  get->add_option("VM", *get_name, "name or UUID")->required();

  auto rm_name = std::make_shared<std::string>();
  CLI::App* rm =
      reg.Add("vm remove", "forget a VM (RemoveVm; refused while it has a replication relationship)", {"RemoveVm"},
              [rm_name](Session& s) {
                v1::VmRequest req;
                req.set_vm(*rm_name);
                v1::MethodResponse resp;
                if (int rc = CallVm(s, "RemoveVm", &v1::VmInventory::Stub::RemoveVm, req, &resp); rc != kExitOk)
                  return rc;
                if (s.json()) s.PrintJson(resp);
                return s.HandleResult("RemoveVm", resp.result(), nullptr);
              });
  rm->add_option("VM", *rm_name, "name or UUID")->required();

  auto start_name = std::make_shared<std::string>();
  CLI::App* start = reg.Add("vm start", "start a committed failover VM again on the replica's disks (StartVm)",
                            {"StartVm"}, [start_name](Session& s) {
                              v1::VmRequest req;
                              req.set_vm(*start_name);
                              return s.Invoke(VMR_RPC(StartVm), req);
                            });
  start->add_option("VM", *start_name, "name or UUID")->required();
}

}  // namespace vmreplica::cli
