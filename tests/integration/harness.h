// Test harness for multi-process tests: runs the real vmreplicad and
// vmreplica binaries of the build tree (VMREPLICA_BUILD_DIR), with lab
// certificates made by the real security module.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vmreplica::testing {

struct RunResult {
  int exit_code = -1;  // -1: killed by a signal or not started
  std::string out;
  std::string err;
};

std::string BuildDir();
std::string DaemonBinary();
std::string CliBinary();

// A fresh directory under /tmp, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs a program to completion (stdin closed) and collects its output.
RunResult RunProgram(const std::vector<std::string>& argv, std::chrono::seconds timeout = std::chrono::seconds(120));

// A TCP port on 127.0.0.1 that was free a moment ago.
uint16_t FreePort();

// Lab PKI: a CA (ca.crt, ca.key) in `dir`.
void MakeCa(const std::string& dir, const std::string& cn);
// A host certificate `name`.crt / `name`.key in `dir`, issued by the CA in `ca_dir`.
void MakeHost(const std::string& ca_dir, const std::string& dir, const std::string& name,
              const std::vector<std::string>& sans);

struct DaemonSpec {
  std::string name;            // used for file names
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  uint16_t port = 0;           // listener port
  std::string extra_toml;      // appended to the generated config
  // [listener] address; a namespace's own address for a daemon run in one.
  std::string listen_address = "127.0.0.1";
  // Prepended to the daemon's command line, e.g. {"/usr/sbin/ip", "netns",
  // "exec", "<ns>"} to run it in a network namespace (see netns.h). The
  // prefix must exec the daemon in the same process (no fork), so that
  // Stop() and Kill() signal the daemon itself; its first element is an
  // absolute path. Empty: the daemon is started directly.
  std::vector<std::string> exec_prefix = {};
};

// One vmreplicad process with its own state dir and admin socket.
class Daemon {
 public:
  Daemon(const TempDir& dir, DaemonSpec spec);
  ~Daemon();

  // Starts the process and waits until its admin socket answers. Returns
  // false (with the daemon's stderr in `error`) when it exits instead.
  bool Start(std::string* error = nullptr);
  // SIGTERM and wait (true when it exited with status 0).
  bool Stop();
  // SIGKILL and wait.
  void Kill();
  bool Running() const { return pid_ > 0; }

  // Runs `vmreplica --socket <ours> args...`.
  RunResult Cli(const std::vector<std::string>& args) const;

  const std::string& socket() const { return socket_; }
  const std::string& config_path() const { return config_; }
  const std::string& log_path() const { return log_; }
  const std::string& state_dir() const { return state_dir_; }
  uint16_t port() const { return spec_.port; }

 private:
  DaemonSpec spec_;
  std::string config_;
  std::string socket_;
  std::string state_dir_;
  std::string log_;
  pid_t pid_ = -1;
};

std::string ReadText(const std::string& path);

// The last non-empty line of `out` parsed as JSON (`vmreplica --json` prints
// one document per line; the final one is the outcome). A discarded value
// when it does not parse.
nlohmann::json LastJsonDocument(const std::string& out);

// A JSON integer; proto3's JSON mapping writes 64-bit fields as strings.
// -1 (with a test failure) for anything else.
int64_t JsonInt(const nlohmann::json& v);

// SHA-256 (hex) of the first `length` bytes of `path`; bytes past the end of
// a shorter (sparse) file count as zeros, as they read on a replica.
std::string Sha256Padded(const std::string& path, uint64_t length);

// Unix time in milliseconds.
int64_t NowMs();

}  // namespace vmreplica::testing
