// vmreplicad: the vmreplica daemon. Thin main: options, logging, signals.
#include <signal.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "daemon/daemon.h"

int main(int argc, char** argv) {
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
