// Failover IP settings (SetFailoverNetworkAdapterSettings) and the cloud-init
// NoCloud seed that carries them into a failover VM. See docs/failover_vm.md.
//
// The seed is an ISO 9660 image with volume label "cidata" holding three
// files: meta-data (instance-id, local-hostname), user-data and
// network-config (cloud-init network configuration version 2). It is
// attached to the failover VM as a read-only second disk; cloud-init in the
// guest finds it by its label.
#pragma once

#include <string>
#include <vector>

#include "vmreplica/status.h"

namespace vmreplica {

// The settings of one network adapter of the failover VM (the fields of the
// reference's Msvm_FailoverNetworkAdapterSettings).
struct FailoverNetworkAdapterSettings {
  // Which guest adapter: a MAC address ("52:54:00:12:34:56", any case; the
  // guest NIC is matched by it) or an interface name ("eth0", 1..15 bytes of
  // [A-Za-z0-9_.-]; matched by name). Unique in the list.
  std::string adapter;
  // Static addresses, IPv4 or IPv6, each with the subnet at the same index.
  std::vector<std::string> ip_addresses;
  // A prefix length ("24", "64") or, for an IPv4 address, a dotted mask
  // ("255.255.255.0", contiguous). Exactly one per IP address.
  std::vector<std::string> subnets;
  // At most 5; each needs a static address of its family on this adapter.
  std::vector<std::string> default_gateways;
  std::vector<std::string> dns_servers;
  // DHCP (v4 and v6) instead of static addresses: then IPAddresses, Subnets
  // and DefaultGateways must be empty (DNS servers may still be given).
  bool dhcp_enabled = false;
};

inline constexpr size_t kMaxDefaultGateways = 5;

// Checks every rule above. InvalidArgument naming the field, e.g.
// "FailoverNetworkAdapterSettings[0].DefaultGateways[5]: at most 5".
// Addresses must be unicast (not unspecified, not multicast).
Status ValidateFailoverNetworkSettings(const std::vector<FailoverNetworkAdapterSettings>& settings);

// The network-config (version 2) YAML for `settings` (validated first):
//   version: 2
//   ethernets:
//     nic<i>:                       one per adapter, in order
//       match: {macaddress: "..."}  or {name: "..."}
//       dhcp4/dhcp6: true | false
//       addresses: ["a/prefix", ...]               (static only)
//       routes: [{to: default net, via: gw, metric: 100 + j}, ...]
//       nameservers: {addresses: [...]}
// Addresses are written in canonical form (inet_ntop).
Result<std::string> RenderNetworkConfigV2(const std::vector<FailoverNetworkAdapterSettings>& settings);

struct NoCloudSeed {
  // cloud-init applies network-config when it sees a new instance-id: give
  // each failover its own. [A-Za-z0-9._-]{1,128}.
  std::string instance_id;
  // RFC 1123 host name: labels of 1..63 [A-Za-z0-9-] (not starting or ending
  // with '-'), at most 253 bytes.
  std::string local_hostname;
  // The user-data file as is; "" = "#cloud-config\n". At most 1 MiB, no NUL.
  std::string user_data;
  // The adapters; empty = no network-config file (the guest keeps its own).
  std::vector<FailoverNetworkAdapterSettings> network;
};

// meta-data YAML: instance-id and local-hostname. InvalidArgument naming the
// field for bad values.
Result<std::string> RenderMetaData(const NoCloudSeed& seed);

struct SeedImageOptions {
  std::string genisoimage_binary = "genisoimage";
};

// Writes the seed image (genisoimage -volid cidata -joliet -rock) to
// `iso_path` atomically (temporary file + rename). InvalidArgument for bad
// settings (as above), FailedPrecondition when genisoimage is not installed
// (Debian package genisoimage), IOError when it fails.
Status WriteNoCloudSeedImage(const NoCloudSeed& seed, const std::string& iso_path, SeedImageOptions options = {});

}  // namespace vmreplica
