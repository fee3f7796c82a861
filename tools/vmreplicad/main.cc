// vmreplicad: the vmreplica daemon. Thin main: options, logging, signals.
#include <malloc.h>
#include <signal.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "daemon/daemon.h"

namespace {

// glibc's defaults make a streaming daemon pay for every large buffer
// twice: allocations of 128 KiB and more (chunks, records, gRPC slices) are
// mmap'ed and unmapped each time until its adaptive threshold catches up, and
// every free at the top of a heap above 128 KiB gives the pages back, so the
// next message faults them in and clears them again. Measured on a 2 GiB
// initial copy (docs/benchmarks.md "Send path and allocator"): both daemons'
// CPU 4.8 -> 3.5..4.0 seconds. Freed memory is kept up to 128 MiB per arena,
// with at most 4 arenas. An operator's own malloc settings (GLIBC_TUNABLES or
// the MALLOC_* variables) win.
void TuneAllocator() {
  const char* t = std::getenv("GLIBC_TUNABLES");
  if (t != nullptr && std::strstr(t, "glibc.malloc.") != nullptr) return;
  for (const char* v : {"MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                        "MALLOC_MMAP_MAX_"}) {
    if (std::getenv(v) != nullptr) return;  // the older variables glibc still reads
  }
  mallopt(M_ARENA_MAX, 4);
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 128 << 20);
}

}  // namespace

int main(int argc, char** argv) {
  TuneAllocator();
  CLI::App app{"vmreplicad: Hyper-V Replica style replication of QEMU/KVM virtual machines"};
  std::string config_path = "/etc/vmreplica/vmreplicad.toml";
  app.add_option("-c,--config", config_path, "configuration file (TOML)");
  bool check_only = false;
  app.add_flag("--check-config", check_only, "check the configuration and the certificates, then exit");
  CLI11_PARSE(app, argc, argv);

  auto config = vmreplica::daemon::LoadConfig(config_path);
  if (!config.ok()) {
    std::cerr << "vmreplicad: bad configuration: " << config.status().message() << "\n";
    return 2;
  }
  try {
    std::shared_ptr<spdlog::logger> logger;
    if (config->log_file.empty()) {
      logger = spdlog::stderr_color_mt("vmreplicad");
    } else {
      logger = spdlog::basic_logger_mt("vmreplicad", config->log_file);
    }
    spdlog::set_default_logger(logger);
    spdlog::set_level(spdlog::level::from_str(config->log_level));
    spdlog::flush_on(spdlog::level::info);
  } catch (const spdlog::spdlog_ex& e) {
    std::cerr << "vmreplicad: cannot open log: " << e.what() << "\n";
    return 2;
  }

  // Signals are taken synchronously by sigwait below; block them in every thread.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto daemon = vmreplica::daemon::Daemon::Create(*config);
  if (!daemon.ok()) {
    spdlog::critical("cannot start: {}", daemon.status().ToString());
    std::cerr << "vmreplicad: cannot start: " << daemon.status().message() << "\n";
    return 1;
  }
  if (check_only) {
    std::cout << "configuration OK\n";
    return 0;
  }
  if (auto s = (*daemon)->Start(); !s.ok()) {
    spdlog::critical("cannot start: {}", s.ToString());
    std::cerr << "vmreplicad: cannot start: " << s.message() << "\n";
    return 1;
  }
  spdlog::info("vmreplicad {} ready", PROJECT_VERSION_STRING);
  for (;;) {
    int sig = 0;
    sigwait(&set, &sig);
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP: configuration reload is not supported; restart vmreplicad to apply changes");
      continue;
    }
    spdlog::info("signal {}: stopping", sig);
    break;
  }
  (*daemon)->Stop();
  return 0;
}
