#include "daemon/daemon.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>

#include "service/tls.h"
#include "vmreplica/security.h"

namespace vmreplica::daemon {

Daemon::Daemon(DaemonConfig config, FileLock lock) : config_(std::move(config)), lock_(std::move(lock)) {}

Result<std::unique_ptr<Daemon>> Daemon::Create(DaemonConfig config) {
  VMR_RETURN_IF_ERROR(MakeDirs(config.state_dir, 0700));
  auto lock = FileLock::Acquire(config.state_dir + "/vmreplicad.lock");
  if (!lock.ok()) return lock.status();
  auto identity = service::LoadIdentity(config.ca_file, config.certificate_file, config.key_file);
  if (!identity.ok()) return identity.status().WithContext("TLS identity");
  auto cert = security::InspectCertificatePem(identity->cert_pem);
  if (!cert.ok()) return cert.status();
  auto names = security::CertificateNames(*cert);
  if (names.empty()) return Status::InvalidArgument("the host certificate names no host (no SAN, no CN)");

  std::unique_ptr<Daemon> d(new Daemon(std::move(config), std::move(*lock)));
  auto catalog = Catalog::Open(d->config_.state_dir + "/catalog.db");
  if (!catalog.ok()) return catalog.status();
  d->catalog_ = std::move(*catalog);

  if (d->config_.listen_port != 0) {
    // [listener] port overrides HttpsPort at every start (docs/configuration.md).
    auto s = d->catalog_->GetServerSettings();
    if (!s.ok()) return s.status();
    if (s->https_port != d->config_.listen_port) {
      spdlog::info("HttpsPort {} -> {} from [listener] port", s->https_port, d->config_.listen_port);
      s->https_port = d->config_.listen_port;
      VMR_RETURN_IF_ERROR(d->catalog_->PutServerSettings(*s));
    }
  }

  JobEngineOptions jopts;
  jopts.worker_threads = d->config_.job_workers;
  d->jobs_ = std::make_unique<JobEngine>(d->catalog_.get(), jopts);
  // No job kind is resumable yet: every job interrupted by a stop ends as
  // Exception with the reason (JobEngine::Recover).
  VMR_RETURN_IF_ERROR(d->jobs_->Recover([](const JobRecord&) { return std::optional<JobWork>(); }));

  d->env_.catalog = d->catalog_.get();
  d->env_.jobs = d->jobs_.get();
  d->env_.listener = d.get();
  d->env_.identity = std::move(*identity);
  // The host's name: its subject CN when the SANs carry it, else the first name.
  std::string cn = cert->subject_cn;
  std::transform(cn.begin(), cn.end(), cn.begin(), [](unsigned char c) { return std::tolower(c); });
  d->env_.host_name = std::find(names.begin(), names.end(), cn) != names.end() ? cn : names.front();
  d->env_.version = PROJECT_VERSION_STRING;
  d->env_.options = d->config_.service;

  ReplicaManagerOptions ropts;
  ropts.staging.catalog = d->catalog_.get();
  ropts.state_dir = d->config_.state_dir;  // GetRangeHashes: <state>/reverse/<vm id>.acand
  ropts.apply_while_receiving = d->config_.apply_while_receiving;
  d->replicas_ = std::make_unique<ReplicaManager>(d->catalog_.get(), ropts);
  d->replicas_->OpenAll();

  ReplicationEngineOptions eopts;
  eopts.run_dir = d->config_.state_dir + "/run";
  eopts.state_dir = d->config_.state_dir;
  eopts.max_parallel_transfers = d->config_.max_parallel_transfers;
  eopts.bandwidth_bytes_per_s = d->config_.bandwidth_limit_bytes_per_s;
  eopts.test_interval_override_ms = d->config_.test_replication_interval_override_ms;
  eopts.test_app_consistent_interval_override_ms = d->config_.test_app_consistent_interval_override_ms;
  eopts.bandwidth_schedule = d->config_.bandwidth_schedule;
  if (eopts.test_app_consistent_interval_override_ms > 0) {
    spdlog::warn("[testing] app_consistent_interval_override_ms = {}: every ApplicationConsistentSnapshotInterval "
                 "is replaced; never use this in production",
                 eopts.test_app_consistent_interval_override_ms);
  }
  if (eopts.test_interval_override_ms > 0) {
    spdlog::warn("[testing] replication_interval_override_ms = {}: every ReplicationInterval is replaced; "
                 "never use this in production",
                 eopts.test_interval_override_ms);
  }
  Daemon* self = d.get();
  auto open_channel = [self](const std::string& host, uint16_t port) -> Result<std::shared_ptr<grpc::Channel>> {
    // The probe tells a refused certificate (32769) from an unreachable host (32777).
    auto probe = security::ProbeTls(host, port, self->env_.identity, host, self->env_.options.connect_timeout);
    if (!probe.ok()) {
      const std::string where = "replica server " + service::JoinHostPort(host, port);
      // No answer in time is "not reachable" for the replication methods (32777).
      if (probe.status().code() == Code::kTimeout) return Status::Unavailable(where + ": " + probe.status().message());
      return probe.status().WithContext(where);
    }
    return service::MakeSecureChannel(host, port, self->env_.identity);
  };
  eopts.open_channel = open_channel;
  // Where the replica can ask this host about its primary VMs: the
  // listener's address, with a wildcard replaced by the certificate's name.
  eopts.advertised_address = [self]() -> std::string {
    if (!self->ListenerRunning()) return "";
    const std::string a = self->ListenAddress();
    const size_t colon = a.rfind(':');
    if (colon == std::string::npos) return "";
    std::string host = a.substr(0, colon);
    if (host == "0.0.0.0" || host == "::" || host == "[::]" || host.empty()) host = self->env_.host_name;
    return host + a.substr(colon);
  };
  d->replication_ = std::make_unique<ReplicationEngine>(d->catalog_.get(), d->jobs_.get(), eopts);
  d->env_.replication = d->replication_.get();

  FailoverOptions fopts;
  fopts.state_dir = d->config_.state_dir;
  fopts.libvirt_vms_through_libvirt = d->config_.libvirt_vms_through_libvirt;
  fopts.test_import_chunk_delay = std::chrono::milliseconds(d->config_.test_import_chunk_delay_ms);
  if (d->config_.test_import_chunk_delay_ms > 0) {
    spdlog::warn("[testing] import_chunk_delay_ms = {}: imports are slowed down; never use this in production",
                 d->config_.test_import_chunk_delay_ms);
  }
  fopts.ask_primary = [open_channel](const std::string& address,
                                     const std::string& vm_id) -> Result<ReplicaClient::PrimaryVmState> {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos || colon == 0) return Status::InvalidArgument("'" + address + "' is not host:port");
    std::string host = address.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    const std::string port_text = address.substr(colon + 1);
    if (port_text.empty() || port_text.size() > 5 ||
        !std::all_of(port_text.begin(), port_text.end(), [](unsigned char c) { return std::isdigit(c); })) {
      return Status::InvalidArgument("'" + address + "' has no valid port");
    }
    const unsigned long port = std::stoul(port_text);
    if (port == 0 || port > 65535) return Status::InvalidArgument("'" + address + "' has no valid port");
    VMR_ASSIGN_OR_RETURN(auto channel, open_channel(host, static_cast<uint16_t>(port)));
    ReplicaClient client(channel);
    return client.GetPrimaryVmState(vm_id);
  };
  fopts.open_channel = open_channel;
  fopts.create_relationship = [self](const std::string& vm_id, const RelationshipSettings& settings) {
    return self->replication_->CreateRelationship(vm_id, settings);
  };
  fopts.advertised_address = eopts.advertised_address;
  d->failover_ = std::make_unique<FailoverManager>(d->catalog_.get(), d->jobs_.get(), d->replicas_.get(), fopts);
  d->env_.failover = d->failover_.get();

  OldPrimaryReverseOptions rvopts;
  rvopts.state_dir = d->config_.state_dir;
  rvopts.run_dir = d->config_.state_dir + "/run";
  d->reverse_ = std::make_unique<OldPrimaryReverse>(d->catalog_.get(), d->jobs_.get(), d->replication_.get(),
                                                    d->replicas_.get(), rvopts);

  d->local_control_ = std::make_unique<service::ControlService>(&d->env_, /*remote=*/false);
  d->remote_control_ = std::make_unique<service::ControlService>(&d->env_, /*remote=*/true);
  d->local_vm_ = std::make_unique<service::VmService>(&d->env_, /*remote=*/false);
  d->remote_vm_ = std::make_unique<service::VmService>(&d->env_, /*remote=*/true);
  d->peer_ = std::make_unique<service::PeerService>(&d->env_, d->replicas_.get(), d->reverse_.get());
  return d;
}

Daemon::~Daemon() { Stop(); }

Status Daemon::Start() {
  // Before any request can arrive: the engine restarts an initial copy that
  // a stop interrupted, which must not race a new StartReplication.
  // A reverse a stop interrupted before its catalog switch is undone first,
  // so that the engine resumes the VM as the primary it still is.
  VMR_RETURN_IF_ERROR(reverse_->Start());
  VMR_RETURN_IF_ERROR(replication_->Start());
  VMR_RETURN_IF_ERROR(failover_->Start());
  const std::string& sock = config_.admin_socket;
  VMR_RETURN_IF_ERROR(MakeDirs(std::filesystem::path(sock).parent_path().string(), 0755));
  // We hold the state-dir lock, so a socket file left here is a dead daemon's.
  ::unlink(sock.c_str());
  grpc::ServerBuilder b;
  b.AddListeningPort("unix:" + sock, grpc::InsecureServerCredentials());
  b.RegisterService(local_control_.get());
  b.RegisterService(local_vm_.get());
  // The socket is created with mode 0600 (umask) and checked after.
  mode_t old_mask = ::umask(0077);
  admin_server_ = b.BuildAndStart();
  ::umask(old_mask);
  if (!admin_server_) return Status::Unavailable("cannot listen on admin socket " + sock);
  if (::chmod(sock.c_str(), 0600) != 0) return Status::IOError("chmod 0600 " + sock);
  spdlog::info("admin socket {} (mode 0600)", sock);
  if (config_.start_listener) VMR_RETURN_IF_ERROR(StartListener());
  return Status::Ok();
}

Status Daemon::StartListener() {
  std::lock_guard<std::mutex> lock(listener_mu_);
  if (stopped_) return Status::FailedPrecondition("vmreplicad is stopping");
  if (listener_) return Status::Ok();
  auto settings = catalog_->GetServerSettings();
  if (!settings.ok()) return settings.status();
  std::string addr = service::JoinHostPort(config_.listen_address, static_cast<uint16_t>(settings->https_port));
  grpc::ServerBuilder b;
  int bound = 0;
  b.AddListeningPort(addr, service::MakeServerCredentials(env_.identity), &bound);
  b.RegisterService(peer_.get());
  b.RegisterService(remote_control_.get());
  b.RegisterService(remote_vm_.get());
  b.SetMaxReceiveMessageSize(64 << 20);
  listener_ = b.BuildAndStart();
  if (!listener_ || bound == 0) {
    listener_.reset();
    return Status::Unavailable("cannot listen on " + addr + " (address in use or not local?)");
  }
  listen_address_ = addr;
  spdlog::info("replica listener on {} (mutual TLS) as {}", addr, env_.host_name);
  return Status::Ok();
}

Status Daemon::StopListener() {
  std::unique_ptr<grpc::Server> server;
  {
    std::lock_guard<std::mutex> lock(listener_mu_);
    server = std::move(listener_);
    listen_address_.clear();
  }
  if (server) {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server->Wait();
    spdlog::info("replica listener stopped");
  }
  return Status::Ok();
}

bool Daemon::ListenerRunning() const {
  std::lock_guard<std::mutex> lock(listener_mu_);
  return listener_ != nullptr;
}

std::string Daemon::ListenAddress() const {
  std::lock_guard<std::mutex> lock(listener_mu_);
  return listen_address_;
}

void Daemon::Stop() {
  {
    std::lock_guard<std::mutex> lock(listener_mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  if (replication_) replication_->Stop();
  StopListener().IgnoreError();
  if (admin_server_) {
    admin_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    admin_server_->Wait();
    admin_server_.reset();
    ::unlink(config_.admin_socket.c_str());
  }
  if (jobs_) jobs_->Shutdown();
  if (failover_) failover_->Stop();  // failover and test VMs keep running
  spdlog::info("vmreplicad stopped");
}

}  // namespace vmreplica::daemon
