#include "vmreplica/cloud_init.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>

#include "launcher/subprocess.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

constexpr size_t kMaxUserDataBytes = 1u << 20;

struct Ip {
  int family = 0;  // AF_INET or AF_INET6
  unsigned char bytes[16] = {};
  std::string text;  // canonical (inet_ntop)
};

std::optional<Ip> ParseIp(const std::string& s) {
  Ip ip;
  if (s.empty() || s.size() > 45) return std::nullopt;
  char buf[INET6_ADDRSTRLEN] = {};
  if (::inet_pton(AF_INET, s.c_str(), ip.bytes) == 1) {
    ip.family = AF_INET;
    if (::inet_ntop(AF_INET, ip.bytes, buf, sizeof(buf)) == nullptr) return std::nullopt;
  } else if (::inet_pton(AF_INET6, s.c_str(), ip.bytes) == 1) {
    ip.family = AF_INET6;
    if (::inet_ntop(AF_INET6, ip.bytes, buf, sizeof(buf)) == nullptr) return std::nullopt;
  } else {
    return std::nullopt;
  }
  ip.text = buf;
  return ip;
}

// Not unspecified, not multicast.
bool Unicast(const Ip& ip) {
  const size_t n = ip.family == AF_INET ? 4 : 16;
  bool all_zero = true;
  for (size_t i = 0; i < n; ++i) all_zero = all_zero && ip.bytes[i] == 0;
  if (all_zero) return false;
  if (ip.family == AF_INET) {
    const bool broadcast = ip.bytes[0] == 255 && ip.bytes[1] == 255 && ip.bytes[2] == 255 && ip.bytes[3] == 255;
    return (ip.bytes[0] & 0xf0) != 0xe0 && !broadcast;
  }
  return ip.bytes[0] != 0xff;
}

const char* FamilyName(int family) { return family == AF_INET ? "IPv4" : "IPv6"; }

// A prefix length for an address of `family`, from "24" or "255.255.255.0".
Result<int> ParseSubnet(const std::string& s, int family) {
  if (!s.empty() && s.size() <= 3 && s.find_first_not_of("0123456789") == std::string::npos) {
    int p = std::stoi(s);
    int max = family == AF_INET ? 32 : 128;
    if (p < 1 || p > max) {
      return Status::InvalidArgument("prefix length " + s + " out of range 1.." + std::to_string(max) + " for " +
                                     FamilyName(family));
    }
    return p;
  }
  auto mask = ParseIp(s);
  if (!mask || mask->family != AF_INET) {
    return Status::InvalidArgument("\"" + s + "\" is neither a prefix length nor a dotted IPv4 mask");
  }
  if (family != AF_INET) return Status::InvalidArgument("a dotted mask is for IPv4 addresses only");
  uint32_t m = (uint32_t{mask->bytes[0]} << 24) | (uint32_t{mask->bytes[1]} << 16) | (uint32_t{mask->bytes[2]} << 8) |
               uint32_t{mask->bytes[3]};
  int ones = 0;
  while (ones < 32 && (m & (0x80000000u >> ones)) != 0) ++ones;
  uint32_t expect = ones == 0 ? 0 : ~uint32_t{0} << (32 - ones);
  if (m != expect || ones == 0) return Status::InvalidArgument("mask " + s + " is not a contiguous netmask");
  return ones;
}

bool IsMac(const std::string& s) {
  if (s.size() != 17) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i % 3 == 2) {
      if (s[i] != ':') return false;
    } else if (std::isxdigit(static_cast<unsigned char>(s[i])) == 0) {
      return false;
    }
  }
  return true;
}

bool IsInterfaceName(const std::string& s) {
  if (s.empty() || s.size() > 15 || s == "." || s == "..") return false;
  for (char c : s) {
    if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '_' && c != '.' && c != '-') return false;
  }
  return true;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A double-quoted YAML scalar (values are validated; this only guards).
std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// What one validated adapter renders to.
struct Adapter {
  bool by_mac = false;
  std::string match;                   // lower-case MAC or the name
  std::vector<std::string> addresses;  // "a/prefix"
  std::vector<Ip> gateways;
  std::vector<Ip> dns;
  bool dhcp = false;
};

Result<std::vector<Adapter>> Check(const std::vector<FailoverNetworkAdapterSettings>& settings) {
  std::vector<Adapter> out;
  std::set<std::string> seen;
  for (size_t i = 0; i < settings.size(); ++i) {
    const FailoverNetworkAdapterSettings& s = settings[i];
    const std::string f = "FailoverNetworkAdapterSettings[" + std::to_string(i) + "].";
    Adapter a;
    if (IsMac(s.adapter)) {
      a.by_mac = true;
      a.match = Lower(s.adapter);
    } else if (IsInterfaceName(s.adapter)) {
      a.match = s.adapter;
    } else {
      return Status::InvalidArgument(f +
                                     "Adapter: a MAC address or an interface name (1..15 of [A-Za-z0-9_.-]) "
                                     "is required, got \"" +
                                     s.adapter + "\"");
    }
    if (!seen.insert(a.match).second) {
      return Status::InvalidArgument(f + "Adapter: \"" + s.adapter + "\" is given twice");
    }
    a.dhcp = s.dhcp_enabled;
    if (s.dhcp_enabled) {
      if (!s.ip_addresses.empty()) {
        return Status::InvalidArgument(f + "IPAddresses: static addresses cannot be given with DHCPEnabled");
      }
      if (!s.subnets.empty()) return Status::InvalidArgument(f + "Subnets: cannot be given with DHCPEnabled");
      if (!s.default_gateways.empty()) {
        return Status::InvalidArgument(f + "DefaultGateways: cannot be given with DHCPEnabled");
      }
    }
    if (s.subnets.size() != s.ip_addresses.size()) {
      return Status::InvalidArgument(f + "Subnets: " + std::to_string(s.subnets.size()) + " subnets for " +
                                     std::to_string(s.ip_addresses.size()) + " IPAddresses (one each)");
    }
    bool has_family[2] = {false, false};  // IPv4, IPv6
    for (size_t j = 0; j < s.ip_addresses.size(); ++j) {
      const std::string af = f + "IPAddresses[" + std::to_string(j) + "]: ";
      auto ip = ParseIp(s.ip_addresses[j]);
      if (!ip) return Status::InvalidArgument(af + "not an IP address: \"" + s.ip_addresses[j] + "\"");
      if (!Unicast(*ip)) return Status::InvalidArgument(af + "not a unicast address: " + ip->text);
      auto prefix = ParseSubnet(s.subnets[j], ip->family);
      if (!prefix.ok()) {
        return Status::InvalidArgument(f + "Subnets[" + std::to_string(j) + "]: " + prefix.status().message());
      }
      has_family[ip->family == AF_INET ? 0 : 1] = true;
      a.addresses.push_back(ip->text + "/" + std::to_string(*prefix));
    }
    if (s.default_gateways.size() > kMaxDefaultGateways) {
      return Status::InvalidArgument(f + "DefaultGateways[" + std::to_string(kMaxDefaultGateways) + "]: at most " +
                                     std::to_string(kMaxDefaultGateways));
    }
    for (size_t j = 0; j < s.default_gateways.size(); ++j) {
      const std::string gf = f + "DefaultGateways[" + std::to_string(j) + "]: ";
      auto ip = ParseIp(s.default_gateways[j]);
      if (!ip) return Status::InvalidArgument(gf + "not an IP address: \"" + s.default_gateways[j] + "\"");
      if (!Unicast(*ip)) return Status::InvalidArgument(gf + "not a unicast address: " + ip->text);
      if (!has_family[ip->family == AF_INET ? 0 : 1]) {
        return Status::InvalidArgument(gf + "no static " + FamilyName(ip->family) + " address on this adapter");
      }
      a.gateways.push_back(*ip);
    }
    for (size_t j = 0; j < s.dns_servers.size(); ++j) {
      const std::string df = f + "DNSServers[" + std::to_string(j) + "]: ";
      auto ip = ParseIp(s.dns_servers[j]);
      if (!ip) return Status::InvalidArgument(df + "not an IP address: \"" + s.dns_servers[j] + "\"");
      if (!Unicast(*ip)) return Status::InvalidArgument(df + "not a unicast address: " + ip->text);
      a.dns.push_back(*ip);
    }
    out.push_back(std::move(a));
  }
  return out;
}

bool ValidInstanceId(const std::string& s) {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s) {
    if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

bool ValidHostname(const std::string& s) {
  if (s.empty() || s.size() > 253) return false;
  size_t start = 0;
  for (;;) {
    size_t dot = s.find('.', start);
    std::string label = s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') return false;
    for (char c : label) {
      if (std::isalnum(static_cast<unsigned char>(c)) == 0 && c != '-') return false;
    }
    if (dot == std::string::npos) return true;
    start = dot + 1;
  }
}

}  // namespace

Status ValidateFailoverNetworkSettings(const std::vector<FailoverNetworkAdapterSettings>& settings) {
  return Check(settings).status();
}

Result<std::string> RenderNetworkConfigV2(const std::vector<FailoverNetworkAdapterSettings>& settings) {
  VMR_ASSIGN_OR_RETURN(std::vector<Adapter> adapters, Check(settings));
  std::string y = "version: 2\n";
  if (adapters.empty()) return y + "ethernets: {}\n";
  y += "ethernets:\n";
  for (size_t i = 0; i < adapters.size(); ++i) {
    const Adapter& a = adapters[i];
    y += "  nic" + std::to_string(i) + ":\n";
    y += "    match:\n";
    y += std::string("      ") + (a.by_mac ? "macaddress: " : "name: ") + Quote(a.match) + "\n";
    y += std::string("    dhcp4: ") + (a.dhcp ? "true" : "false") + "\n";
    y += std::string("    dhcp6: ") + (a.dhcp ? "true" : "false") + "\n";
    if (!a.addresses.empty()) {
      y += "    addresses:\n";
      for (const auto& addr : a.addresses) y += "      - " + Quote(addr) + "\n";
    }
    if (!a.gateways.empty()) {
      y += "    routes:\n";
      for (size_t j = 0; j < a.gateways.size(); ++j) {
        y += "      - to: " + Quote(a.gateways[j].family == AF_INET ? "0.0.0.0/0" : "::/0") + "\n";
        y += "        via: " + Quote(a.gateways[j].text) + "\n";
        y += "        metric: " + std::to_string(100 + j) + "\n";
      }
    }
    if (!a.dns.empty()) {
      y += "    nameservers:\n";
      y += "      addresses:\n";
      for (const auto& d : a.dns) y += "        - " + Quote(d.text) + "\n";
    }
  }
  return y;
}

Result<std::string> RenderMetaData(const NoCloudSeed& seed) {
  if (!ValidInstanceId(seed.instance_id)) {
    return Status::InvalidArgument("instance_id: 1..128 of [A-Za-z0-9._-] required, got \"" + seed.instance_id + "\"");
  }
  if (!ValidHostname(seed.local_hostname)) {
    return Status::InvalidArgument("local_hostname: not an RFC 1123 host name: \"" + seed.local_hostname + "\"");
  }
  return "instance-id: " + Quote(seed.instance_id) + "\nlocal-hostname: " + Quote(seed.local_hostname) + "\n";
}

Status WriteNoCloudSeedImage(const NoCloudSeed& seed, const std::string& iso_path, SeedImageOptions options) {
  VMR_ASSIGN_OR_RETURN(std::string meta, RenderMetaData(seed));
  std::string user = seed.user_data.empty() ? std::string("#cloud-config\n") : seed.user_data;
  if (user.size() > kMaxUserDataBytes) return Status::InvalidArgument("user_data: at most 1 MiB");
  if (user.find('\0') != std::string::npos) return Status::InvalidArgument("user_data: no NUL bytes");
  std::optional<std::string> network;
  if (!seed.network.empty()) {
    VMR_ASSIGN_OR_RETURN(std::string n, RenderNetworkConfigV2(seed.network));
    network = std::move(n);
  }
  if (iso_path.empty() || launcher_internal::HasControlChars(iso_path)) {
    return Status::InvalidArgument("iso_path: bad path");
  }
  const std::filesystem::path target(iso_path);
  std::string parent = target.parent_path().string();
  if (parent.empty()) parent = ".";
  std::string tmpl = parent + "/.seed-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return Status::IOError("mkdtemp " + tmpl + ": " + std::strerror(errno));
  const std::string work = tmpl;
  struct RemoveWork {
    std::string dir;
    ~RemoveWork() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_work{work};

  VMR_RETURN_IF_ERROR(WriteFileAtomic(work + "/meta-data", meta, 0644));
  VMR_RETURN_IF_ERROR(WriteFileAtomic(work + "/user-data", user, 0644));
  std::vector<std::string> argv = {options.genisoimage_binary,
                                   "-quiet",
                                   "-output",
                                   work + "/seed.iso",
                                   "-volid",
                                   "cidata",
                                   "-joliet",
                                   "-rock",
                                   work + "/user-data",
                                   work + "/meta-data"};
  if (network) {
    VMR_RETURN_IF_ERROR(WriteFileAtomic(work + "/network-config", *network, 0644));
    argv.push_back(work + "/network-config");
  }
  VMR_ASSIGN_OR_RETURN(auto c, launcher_internal::RunCapture(argv));
  if (c.exit_code == 127) {
    return Status::FailedPrecondition("genisoimage is not installed (Debian package genisoimage)");
  }
  if (c.exit_code != 0) return Status::IOError("genisoimage failed: " + c.output);
  {
    const std::string made = work + "/seed.iso";
    int fd = ::open(made.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::IOError("open " + made + ": " + std::strerror(errno));
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) return Status::IOError("fsync " + made + ": " + std::strerror(err));
  }
  if (::rename((work + "/seed.iso").c_str(), iso_path.c_str()) != 0) {
    return Status::IOError("rename to " + iso_path + ": " + std::strerror(errno));
  }
  return FsyncParentDir(iso_path);
}

}  // namespace vmreplica
