// ProbeKvm(): is /dev/kvm usable for a guest here? (see vm_launcher.h)
//
// The vCPU part runs in a forked child with a deadline: on a broken nested
// setup KVM_RUN may never return, and the daemon must not hang with it.
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

// Exit codes of the probe child, one per step that can fail.
enum ProbeExit : int {
  kProbeOk = 0,
  kOpenFailed = 10,
  kBadApiVersion,
  kNoSupportedCpuid,
  kMissingCpuFeature,
  kCreateVmFailed,
  kMemoryFailed,
  kCreateVcpuFailed,
  kVcpuMmapFailed,
  kRegsFailed,
  kRunFailed,
  kNotHalted,
};

const char* ProbeExitText(int code) {
  switch (code) {
    case kOpenFailed:
      return "cannot open /dev/kvm read-write";
    case kBadApiVersion:
      return "KVM API version is not 12";
    case kNoSupportedCpuid:
      return "KVM_GET_SUPPORTED_CPUID failed";
    case kMissingCpuFeature:
      return "KVM's supported CPUID lacks a feature of QEMU's default x86-64 CPU model (nested virtualisation?)";
    case kCreateVmFailed:
      return "KVM_CREATE_VM failed";
    case kMemoryFailed:
      return "guest memory setup failed";
    case kCreateVcpuFailed:
      return "KVM_CREATE_VCPU failed";
    case kVcpuMmapFailed:
      return "mapping the vCPU run area failed";
    case kRegsFailed:
      return "setting vCPU registers failed";
    case kRunFailed:
      return "KVM_RUN failed";
    case kNotHalted:
      return "a real-mode hlt did not exit with KVM_EXIT_HLT";
    default:
      return "unknown probe failure";
  }
}

constexpr uint32_t kCpuidEntries = 256;
// KVM_GET_SUPPORTED_CPUID as C compiles it. The kernel header declares
// kvm_cpuid2's flexible array in a way that makes sizeof 12 in C++ (8 in C),
// and that size is part of the ioctl number: the C++ macro value is refused
// with EINVAL. The struct's fixed part is two __u32 (nent, padding).
constexpr unsigned long kGetSupportedCpuid = _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x05, 2 * sizeof(__u32));

// Only raw system calls: runs in the forked child.
int ProbeChild() {
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) return kOpenFailed;
  if (::ioctl(kvm, KVM_GET_API_VERSION, 0) != 12) return kBadApiVersion;

  // Static: no allocation in the child.
  alignas(kvm_cpuid2) static unsigned char cpuid_buf[sizeof(kvm_cpuid2) + kCpuidEntries * sizeof(kvm_cpuid_entry2)];
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(cpuid_buf);
  cpuid->nent = kCpuidEntries;
  if (::ioctl(kvm, kGetSupportedCpuid, cpuid) < 0) return kNoSupportedCpuid;
  // QEMU's default model (qemu64): leaf 1 EDX fpu tsc msr pae cx8 apic sep
  // cmov mmx fxsr sse sse2, ECX sse3 cx16; leaf 0x80000001 EDX syscall nx lm.
  constexpr uint32_t kLeaf1Edx = (1u << 0) | (1u << 4) | (1u << 5) | (1u << 6) | (1u << 8) | (1u << 9) | (1u << 11) |
                                 (1u << 15) | (1u << 23) | (1u << 24) | (1u << 25) | (1u << 26);
  constexpr uint32_t kLeaf1Ecx = (1u << 0) | (1u << 13);
  constexpr uint32_t kExtEdx = (1u << 11) | (1u << 20) | (1u << 29);
  bool leaf1 = false, ext = false;
  for (uint32_t i = 0; i < cpuid->nent && i < kCpuidEntries; ++i) {
    const kvm_cpuid_entry2& e = cpuid->entries[i];
    if (e.function == 1 && e.index == 0) {
      if ((e.edx & kLeaf1Edx) != kLeaf1Edx || (e.ecx & kLeaf1Ecx) != kLeaf1Ecx) return kMissingCpuFeature;
      leaf1 = true;
    } else if (e.function == 0x80000001u) {
      if ((e.edx & kExtEdx) != kExtEdx) return kMissingCpuFeature;
      ext = true;
    }
  }
  if (!leaf1 || !ext) return kMissingCpuFeature;

  int vm = ::ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) return kCreateVmFailed;
  void* mem = ::mmap(nullptr, 0x1000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return kMemoryFailed;
  static_cast<unsigned char*>(mem)[0] = 0xf4;  // hlt
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.guest_phys_addr = 0;
  region.memory_size = 0x1000;
  region.userspace_addr = reinterpret_cast<uint64_t>(mem);
  if (::ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return kMemoryFailed;
  int vcpu = ::ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) return kCreateVcpuFailed;
  int run_size = ::ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size <= 0) return kVcpuMmapFailed;
  void* run_area = ::mmap(nullptr, static_cast<size_t>(run_size), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run_area == MAP_FAILED) return kVcpuMmapFailed;
  kvm_sregs sregs{};
  if (::ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return kRegsFailed;
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (::ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return kRegsFailed;
  kvm_regs regs{};
  regs.rip = 0;
  regs.rflags = 0x2;
  if (::ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return kRegsFailed;
  if (::ioctl(vcpu, KVM_RUN, 0) < 0) return kRunFailed;
  if (static_cast<kvm_run*>(run_area)->exit_reason != KVM_EXIT_HLT) return kNotHalted;
  return kProbeOk;
}

Status ProbeKvmUncached() {
  if (::access("/dev/kvm", F_OK) != 0) return Status::FailedPrecondition("KVM not usable: no /dev/kvm");
  pid_t pid = ::fork();
  if (pid < 0) return Status::FailedPrecondition(std::string("KVM probe: fork: ") + std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::_exit(ProbeChild());
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    int wstatus = 0;
    pid_t r = ::waitpid(pid, &wstatus, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == kProbeOk) return Status::Ok();
      if (WIFEXITED(wstatus)) {
        return Status::FailedPrecondition(std::string("KVM not usable: ") + ProbeExitText(WEXITSTATUS(wstatus)));
      }
      return Status::FailedPrecondition("KVM not usable: the probe ended with wait status " + std::to_string(wstatus));
    }
    if (r < 0 && errno != EINTR) {
      return Status::FailedPrecondition(std::string("KVM probe: waitpid: ") + std::strerror(errno));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
      }
      return Status::FailedPrecondition("KVM not usable: a real-mode hlt did not finish within 5 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

const char* VmAccelName(VmAccel accel) {
  switch (accel) {
    case VmAccel::kAuto:
      return "auto";
    case VmAccel::kKvm:
      return "kvm";
    case VmAccel::kTcg:
      return "tcg";
  }
  return "?";
}

Status ProbeKvm() {
  static std::once_flag once;
  static Status result;
  std::call_once(once, [] { result = ProbeKvmUncached(); });
  return result;
}

}  // namespace vmreplica
