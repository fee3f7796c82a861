#include "integration/netns.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <sstream>
#include <thread>

#include "integration/harness.h"

namespace vmreplica::testing {
namespace {

constexpr char kPrefix[] = "vmrnt-";
constexpr char kVethA[] = "veth-a";
constexpr char kVethB[] = "veth-b";

std::string FindIp() {
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return "";
}

bool ProcessExists(pid_t pid) { return ::kill(pid, 0) == 0 || errno == EPERM; }

// Deletes namespaces named vmrnt-<pid>-* whose process is gone: pairs left
// behind by a test process of this fixture that was killed before its
// destructors ran. Best effort.
void DeleteStalePairs(const std::string& ip) {
  RunResult list = RunProgram({ip, "netns", "list"}, std::chrono::seconds(30));
  if (list.exit_code != 0) return;
  std::istringstream lines(list.out);
  for (std::string line; std::getline(lines, line);) {
    // "vmrnt-123-0-a" or "vmrnt-123-0-a (id: 4)".
    const std::string name = line.substr(0, line.find(' '));
    if (name.rfind(kPrefix, 0) != 0) continue;
    const std::string rest = name.substr(sizeof(kPrefix) - 1);
    const size_t dash = rest.find('-');
    if (dash == 0 || dash == std::string::npos || rest.find_first_not_of("0123456789") != dash) continue;
    const long pid = std::stol(rest.substr(0, dash));
    if (pid <= 0 || pid == ::getpid() || ProcessExists(static_cast<pid_t>(pid))) continue;
    RunProgram({ip, "netns", "delete", name}, std::chrono::seconds(30));
  }
}

}  // namespace

Result<std::unique_ptr<NetnsPair>> NetnsPair::Create() {
  if (::geteuid() != 0) return Status::PermissionDenied("network namespaces need root (euid is not 0)");
  std::string ip = FindIp();
  if (ip.empty()) return Status::NotFound("iproute2 'ip' not found (install the iproute2 package)");
  DeleteStalePairs(ip);

  static std::atomic<int> counter{0};
  const int k = counter.fetch_add(1);
  const pid_t pid = ::getpid();
  std::unique_ptr<NetnsPair> pair(new NetnsPair());
  pair->ip_ = ip;
  const std::string base = kPrefix + std::to_string(pid) + "-" + std::to_string(k);
  pair->ns_a_ = base + "-a";
  pair->ns_b_ = base + "-b";
  const std::string net = "10.213." + std::to_string(1 + pid % 250) + ".";
  pair->addr_a_ = net + "1";
  pair->addr_b_ = net + "2";
  Status s = pair->Build();
  if (!s.ok()) return s;  // the destructor removes what was made
  return pair;
}

Status NetnsPair::Build() {
  VMR_RETURN_IF_ERROR(Ip({"netns", "add", ns_a_}));
  made_a_ = true;
  VMR_RETURN_IF_ERROR(Ip({"netns", "add", ns_b_}));
  made_b_ = true;
  VMR_RETURN_IF_ERROR(
      Ip({"link", "add", kVethA, "netns", ns_a_, "type", "veth", "peer", "name", kVethB, "netns", ns_b_}));
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_a_, "addr", "add", addr_a_ + "/24", "dev", kVethA}));
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_b_, "addr", "add", addr_b_ + "/24", "dev", kVethB}));
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_a_, "link", "set", "lo", "up"}));
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_b_, "link", "set", "lo", "up"}));
  return LinkUp();
}

NetnsPair::~NetnsPair() {
  // Deleting a namespace also deletes the veth end inside it and, with it,
  // its peer. Errors are ignored: nothing more can be done here.
  if (made_a_) Ip({"netns", "delete", ns_a_}).IgnoreError();
  if (made_b_) Ip({"netns", "delete", ns_b_}).IgnoreError();
}

std::vector<std::string> NetnsPair::ExecPrefix(Side side) const { return {ip_, "netns", "exec", name(side)}; }

Status NetnsPair::Ip(const std::vector<std::string>& args) const {
  std::vector<std::string> argv = {ip_};
  argv.insert(argv.end(), args.begin(), args.end());
  RunResult r = RunProgram(argv, std::chrono::seconds(30));
  if (r.exit_code == 0) return Status::Ok();
  std::string cmd;
  for (const auto& a : argv) cmd += (cmd.empty() ? "" : " ") + a;
  return Status::Internal("'" + cmd + "' exited with " + std::to_string(r.exit_code) + ": " + r.err);
}

Status NetnsPair::LinkDown() {
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_a_, "link", "set", kVethA, "down"}));
  return Ip({"-n", ns_b_, "link", "set", kVethB, "down"});
}

Result<bool> NetnsPair::HasCarrier(Side side) const {
  const std::string dev = side == Side::kA ? kVethA : kVethB;
  RunResult r = RunProgram({ip_, "-n", name(side), "-o", "link", "show", "dev", dev}, std::chrono::seconds(30));
  if (r.exit_code != 0) return Status::Internal("ip link show " + dev + " in " + name(side) + ": " + r.err);
  // "2: veth-a@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 ..."
  const size_t open = r.out.find('<');
  const size_t close = r.out.find('>', open == std::string::npos ? 0 : open);
  if (open == std::string::npos || close == std::string::npos) {
    return Status::Internal("unexpected 'ip link show' output: " + r.out);
  }
  const std::string flags = "," + r.out.substr(open + 1, close - open - 1) + ",";
  return flags.find(",LOWER_UP,") != std::string::npos;
}

Status NetnsPair::LinkUp() {
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_a_, "link", "set", kVethA, "up"}));
  VMR_RETURN_IF_ERROR(Ip({"-n", ns_b_, "link", "set", kVethB, "up"}));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (true) {
    VMR_ASSIGN_OR_RETURN(bool a, HasCarrier(Side::kA));
    VMR_ASSIGN_OR_RETURN(bool b, HasCarrier(Side::kB));
    if (a && b) return Status::Ok();
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::Timeout("veth pair " + ns_a_ + " <-> " + ns_b_ + " has no carrier 10 s after link up");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace vmreplica::testing
