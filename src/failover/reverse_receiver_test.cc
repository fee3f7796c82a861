// PrepareReverse end to end on the old primary A: a ReplicaClient with B's
// certificate calls a real PeerService (mutual TLS, lab PKI) whose
// OldPrimaryReverse works on a real catalog, real qcow2 images tracked by a
// real ChangeTracker in a qemu-storage-daemon, a real JobEngine,
// ReplicationEngine and ReplicaManager. Expected candidates are computed here
// from the offsets written; contents are compared with `qemu-img compare`.
#include "vmreplica/reverse_receiver.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "blockio/qsd_testing.h"
#include "service/peer_service.h"
#include "service/tls.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/qmp.h"
#include "vmreplica/security.h"
#include "vmreplica/tracker.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;
using blockio_testing::QemuIo;
using blockio_testing::RunCommand;

constexpr uint64_t kMiB = 1ull << 20;
constexpr char kVm[] = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
constexpr char kRequest[] = "11111111-2222-4333-8444-555555555555";
constexpr char kOtherRequest[] = "66666666-7777-4888-9999-aaaaaaaaaaaa";
constexpr char kGenerationHex[] = "00112233445566778899aabbccddeeff";
constexpr uint64_t kCommonSequence = 7;
constexpr int64_t kLastReplicationMs = 1700000000123;
const std::vector<ReplicaDisk> kDisks = {{"vda", 8 * kMiB}, {"vdb", 4 * kMiB}};

bool Exists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

class ReverseReceiverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-rr-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    pki_ = root_ + "/pki";
    state_ = root_ + "/state";
    storage_ = root_ + "/storage";
    fs::create_directories(pki_);
    fs::create_directories(state_);
    for (const char* tool : {"qemu-img", "qemu-storage-daemon", "qemu-io"}) {
      auto v = RunCommand({tool, "--version"});
      ASSERT_TRUE(v.ok()) << tool << " is required (packages qemu-utils, qemu-system-common): "
                          << v.status().ToString();
    }
    ASSERT_TRUE(security::CreateLabCa(pki_ + "/ca.crt", pki_ + "/ca.key", "reverse test CA", 2).ok());
    for (const std::string name : {"old-primary-a.lab", "replica-b.lab", "intruder.lab"}) {
      std::vector<std::string> sans = {name};
      if (name == "old-primary-a.lab") sans.push_back("127.0.0.1");
      ASSERT_TRUE(security::IssueHostCertificate(pki_ + "/ca.crt", pki_ + "/ca.key", name, sans,
                                                 pki_ + "/" + name + ".crt", pki_ + "/" + name + ".key", 2)
                      .ok());
    }
    auto cat = Catalog::Open(root_ + "/catalog.db");
    ASSERT_TRUE(cat.ok()) << cat.status().ToString();
    catalog_ = std::move(*cat);
    ServerSettings ss;
    ss.recovery_server_enabled = true;
    ASSERT_TRUE(catalog_->PutServerSettings(ss).ok());
    // A authorises B (and, to reach the role check, the intruder too).
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"replica-b.lab", storage_, "tg-b"}).ok());
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"intruder.lab", storage_, "tg-b"}).ok());

    jobs_ = std::make_unique<JobEngine>(catalog_.get(), JobEngineOptions{});
    ReplicationEngineOptions eo;
    eo.run_dir = root_ + "/erun";
    eo.open_channel = [](const std::string&, uint16_t) -> Result<std::shared_ptr<grpc::Channel>> {
      return Status::Unavailable("no replica in this test");
    };
    engine_ = std::make_unique<ReplicationEngine>(catalog_.get(), jobs_.get(), eo);
    ReplicaManagerOptions mo;
    mo.state_dir = state_;
    manager_ = std::make_unique<ReplicaManager>(catalog_.get(), mo);
    OldPrimaryReverseOptions ro;
    ro.state_dir = state_;
    ro.run_dir = root_ + "/run";
    reverse_ = std::make_unique<OldPrimaryReverse>(catalog_.get(), jobs_.get(), engine_.get(), manager_.get(), ro);
    ASSERT_TRUE(reverse_->Start().ok());

    env_.catalog = catalog_.get();
    env_.host_name = "old-primary-a.lab";
    env_.identity = Identity("old-primary-a.lab");
    peer_ = std::make_unique<service::PeerService>(&env_, manager_.get(), reverse_.get());
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", service::MakeServerCredentials(env_.identity), &port);
    b.RegisterService(peer_.get());
    b.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    port_ = static_cast<uint16_t>(port);
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
    server_.reset();
    jobs_->Shutdown();
    peer_.reset();
    reverse_.reset();
    engine_.reset();
    manager_.reset();
    jobs_.reset();
    catalog_.reset();
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  security::TlsIdentity Identity(const std::string& name) {
    auto id = service::LoadIdentity(pki_ + "/ca.crt", pki_ + "/" + name + ".crt", pki_ + "/" + name + ".key");
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    return id.ok() ? *id : security::TlsIdentity{};
  }

  std::unique_ptr<ReplicaClient> Client(const std::string& name) {
    return std::make_unique<ReplicaClient>(service::MakeSecureChannel("127.0.0.1", port_, Identity(name)));
  }

  // A's VM: two qcow2 images tracked for relationship kVm; `after_cut`
  // writes (offset, length: 4 KiB aligned) per disk land after the last
  // acknowledged cut. `lose_tracking`: the daemon is killed at the end (the
  // bitmaps stay inconsistent). The catalog makes it the primary of
  // relationship 0 in `state`, replicating to replica-b.lab, with the
  // definition of kind qmp whose monitor socket does not exist.
  void MakePrimaryVm(ReplicationState state, bool lose_tracking,
                     const std::vector<std::vector<std::pair<uint64_t, uint64_t>>>& after_cut) {
    def_.name = "vm-x";
    def_.uuid = kVm;
    def_.memory_mib = 256;
    def_.vcpus = 1;
    def_.kind = VmSourceKind::kQmp;
    def_.qmp_socket = root_ + "/no-qemu/qmp.sock";
    for (const auto& d : kDisks) {
      const std::string path = root_ + "/" + d.name + ".qcow2";
      auto c = RunCommand({"qemu-img", "create", "-f", "qcow2", path, std::to_string(d.size)});
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      def_.disks.push_back(VmDiskSpec{d.name, d.name, path, "qcow2", d.size});
    }
    {
      const std::string dir = root_ + "/q";
      ASSERT_TRUE(MakeDirs(dir, 0700).ok());
      QsdOptions o;
      o.run_dir = dir;
      for (const auto& d : def_.disks) o.disks.push_back(QsdDisk{d.name, d.path, d.format, true});
      QsdProcess qsd(o);
      ASSERT_TRUE(qsd.Start().ok());
      auto client = QmpClient::Connect(qsd.qmp_socket());
      ASSERT_TRUE(client.ok()) << client.status().ToString();
      std::vector<TrackedDisk> tracked;
      for (const auto& d : def_.disks) tracked.push_back(TrackedDisk{d.name, d.name, d.size_bytes, true});
      TrackerOptions topt;
      topt.nbd_socket = qsd.nbd_socket();
      ChangeTracker tracker(client->get(), kVm, tracked, topt);
      ASSERT_TRUE(tracker.Enable().ok());
      // Replicated and acknowledged: not candidates.
      ASSERT_TRUE(QemuIo("nbd+unix:///vda?socket=" + qsd.nbd_socket(), {"write -P 0x11 0 2M"}).ok());
      ASSERT_TRUE(QemuIo("nbd+unix:///vdb?socket=" + qsd.nbd_socket(), {"write -P 0x22 1M 1M"}).ok());
      auto cut = tracker.TakeCut(dir);
      ASSERT_TRUE(cut.ok()) << cut.status().ToString();
      ASSERT_TRUE(tracker.Commit(*cut).ok());
      for (size_t i = 0; i < after_cut.size(); ++i) {
        for (const auto& [off, len] : after_cut[i]) {
          ASSERT_TRUE(QemuIo("nbd+unix:///" + kDisks[i].name + "?socket=" + qsd.nbd_socket(),
                             {"write -P 0x5a " + std::to_string(off) + " " + std::to_string(len)})
                          .ok());
        }
      }
      client->reset();
      if (lose_tracking) {
        ASSERT_TRUE(qsd.Kill().ok());
      } else {
        ASSERT_TRUE(qsd.Stop().ok());
      }
    }
    VmRecord v = ToVmRecord(def_);
    v.name = def_.name;
    v.mode = ReplicationMode::kPrimary;
    v.created_ms = 1;
    ASSERT_TRUE(catalog_->PutVm(v).ok());
    ASSERT_TRUE(catalog_->PutDisks(kVm, ToDiskRecords(def_)).ok());
    RelationshipRecord rel;
    rel.vm_id = kVm;
    rel.index = 0;
    rel.local_mode = ReplicationMode::kPrimary;
    rel.state = state;
    rel.health = ReplicationHealth::kNormal;
    rel.settings = Settings("replica-b.lab");
    rel.generation_id = kGenerationHex;
    rel.sequence = kCommonSequence;
    rel.last_replication_ms = kLastReplicationMs;
    rel.last_replication_type = state == ReplicationState::kSyncedReplicationComplete ? ReplicationType::kPlanned
                                                                                      : ReplicationType::kRegular;
    ASSERT_TRUE(catalog_->PutRelationship(rel).ok());
    StatisticsRecord st;
    st.vm_id = kVm;
    st.index = 0;
    st.start_ms = 1;
    st.replication_success_count = 42;
    st.replication_size_bytes = 4242;
    ASSERT_TRUE(catalog_->PutStatistics(st).ok());
  }

  static RelationshipSettings Settings(const std::string& recovery) {
    RelationshipSettings s;
    s.recovery_connection_point = recovery;
    s.recovery_server_port = 8443;
    s.certificate_thumbprint = "0123456789abcdef0123456789abcdef01234567";
    return s;
  }

  PrepareReverseParams Params(const std::string& request_id = kRequest) const {
    PrepareReverseParams p;
    p.vm_id = kVm;
    p.request_id = request_id;
    p.purpose = 1;
    p.vm_name = "vm-x";
    p.disks = kDisks;
    p.settings = Settings("old-primary-a.lab");  // the reversed relationship replicates to A
    p.primary_address = "replica-b.lab:8443";
    return p;
  }

  // Calls PrepareReverse until phase 2 (polls the call itself).
  Result<PrepareReverseAnswer> PrepareUntilDone(ReplicaClient& client, const PrepareReverseParams& p) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    std::string job_id;
    for (;;) {
      auto a = client.PrepareReverse(p);
      if (!a.ok() || a->done) return a;
      EXPECT_FALSE(a->job_id.empty());
      if (!job_id.empty()) {
        EXPECT_EQ(a->job_id, job_id);
      }
      job_id = a->job_id;
      if (std::chrono::steady_clock::now() > deadline) return Status::Timeout("the reverse did not finish");
      auto j = jobs_->Wait(job_id, std::chrono::milliseconds(200));
      if (j.ok() && j->state == JobState::kException) {
        return Status::Internal("job failed: " + j->error_description);
      }
    }
  }

  std::string StoreDir() const { return storage_ + "/" + kVm; }

  std::vector<std::string> Bitmaps(const std::string& image) {
    auto r = RunCommand({"qemu-img", "info", "--force-share", "--output=json", image});
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    std::vector<std::string> names;
    if (!r.ok()) return names;
    auto j = nlohmann::json::parse(*r, nullptr, false);
    if (j.is_discarded()) return names;
    const auto& bm = j["format-specific"]["data"]["bitmaps"];
    if (bm.is_array()) {
      for (const auto& b : bm) names.push_back(b["name"].get<std::string>());
    }
    return names;
  }

  // Everything 13.4 says about A after its switch, and the store's content.
  void ExpectAdopted(ReplicationType kind) {
    auto vm = catalog_->GetVm(kVm);
    ASSERT_TRUE(vm.ok() && *vm);
    EXPECT_EQ((*vm)->mode, ReplicationMode::kReplica);
    EXPECT_EQ((*vm)->definition_json, ToVmRecord(def_).definition_json);
    auto rel = catalog_->GetRelationship(kVm, 0);
    ASSERT_TRUE(rel.ok() && *rel);
    EXPECT_EQ((*rel)->local_mode, ReplicationMode::kReplica);
    EXPECT_EQ((*rel)->state, ReplicationState::kWaitingToCompleteInitialReplication);
    EXPECT_EQ((*rel)->sequence, 1u);
    EXPECT_EQ((*rel)->generation_id, kGenerationHex);
    EXPECT_EQ((*rel)->settings.primary_connection_point, "replica-b.lab:8443");
    EXPECT_EQ((*rel)->settings.primary_host_system, "replica-b.lab");
    EXPECT_EQ((*rel)->settings.recovery_connection_point, "old-primary-a.lab");
    auto points = catalog_->ListRecoveryPoints(kVm);
    ASSERT_TRUE(points.ok());
    ASSERT_EQ(points->size(), 1u);
    EXPECT_EQ((*points)[0].sequence, 1u);
    EXPECT_EQ((*points)[0].generation_id, kGenerationHex);
    EXPECT_EQ((*points)[0].kind, static_cast<uint16_t>(kind));
    EXPECT_EQ((*points)[0].time_ms, kLastReplicationMs);
    auto st = catalog_->GetStatistics(kVm, 0);
    ASSERT_TRUE(st.ok() && *st);
    EXPECT_EQ((*st)->replication_success_count, 0u);
    EXPECT_EQ((*st)->replication_size_bytes, 0u);
    for (const auto& d : def_.disks) {
      const std::string target = StoreDir() + "/disks/" + d.name + ".img";
      auto c = RunCommand({"qemu-img", "compare", "-f", "raw", target, "-F", "qcow2", d.path});
      EXPECT_TRUE(c.ok()) << d.name << ": " << c.status().ToString();
      for (const auto& b : Bitmaps(d.path)) EXPECT_NE(b.rfind("vmr-", 0), 0u) << d.path << " keeps " << b;
    }
    EXPECT_TRUE(Exists(StoreDir() + ".primary"));
    auto rec = ReadReverseRecord(ReverseRecvRecordPath(state_, kVm));
    ASSERT_TRUE(rec.ok()) << rec.status().ToString();
    auto decoded = ReverseRecvRecord::Decode(*rec, state_);
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    EXPECT_EQ(decoded->phase, "switched");
    EXPECT_EQ(decoded->store_dir, StoreDir());
    EXPECT_TRUE(decoded->created_dir);
  }

  std::string root_, pki_, state_, storage_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<JobEngine> jobs_;
  std::unique_ptr<ReplicationEngine> engine_;
  std::unique_ptr<ReplicaManager> manager_;
  std::unique_ptr<OldPrimaryReverse> reverse_;
  service::ServiceEnv env_;
  std::unique_ptr<service::PeerService> peer_;
  std::unique_ptr<grpc::Server> server_;
  uint16_t port_ = 0;
  VmDefinition def_;
};

GenerationId Generation() {
  GenerationId g{};
  for (size_t i = 0; i < 16; ++i) {
    g[i] = static_cast<uint8_t>(std::stoi(std::string(kGenerationHex + 2 * i, 2), nullptr, 16));
  }
  return g;
}

TEST_F(ReverseReceiverTest, AfterPlannedFailoverAdoptsTheDisksAndAnswersTheClaim) {
  // Written after the last acknowledged cut (A's candidates): 64 KiB at
  // 3 MiB of vda, 8 KiB at 256 KiB and 4 KiB at 3 MiB of vdb.
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false,
                {{{3 * kMiB, 65536}}, {{256 * 1024, 8192}, {3 * kMiB, 4096}}});
  auto b = Client("replica-b.lab");
  auto a = PrepareUntilDone(*b, Params());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->claim.generation, Generation());
  EXPECT_EQ(a->claim.common_sequence, kCommonSequence);
  EXPECT_TRUE(a->claim.tracking_intact);
  EXPECT_EQ(a->claim.candidate_bytes, 65536u + 8192u + 4096u);
  EXPECT_GT(a->claim.local_copy_bytes, 0u);
  EXPECT_EQ(a->status.expected_sequence, 2u);
  EXPECT_EQ(a->status.latest_applied, 1u);
  EXPECT_EQ(a->status.state, ReplicationState::kWaitingToCompleteInitialReplication);
  ExpectAdopted(ReplicationType::kPlanned);

  // The acand file holds exactly the writes after the cut.
  auto acand = ReadRangeListFile(ReverseAcandPath(state_, kVm), kRangeListCandidates, 2);
  ASSERT_TRUE(acand.ok()) << acand.status().ToString();
  const std::vector<RangeEntry> want = {{0, 3 * kMiB, 65536, 0}, {1, 256 * 1024, 8192, 0}, {1, 3 * kMiB, 4096, 0}};
  EXPECT_EQ(acand->entries, want);

  // The ReplicaManager serves the adopted store (opened lazily).
  auto status = b->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(status->expected_sequence, 2u);
  EXPECT_EQ(status->latest_applied, 1u);
  EXPECT_EQ(status->state, ReplicationState::kWaitingToCompleteInitialReplication);

  // A retry of the same request answers the stored claim.
  auto again = b->PrepareReverse(Params());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(again->done);
  EXPECT_EQ(again->claim, a->claim);
  EXPECT_EQ(again->status.latest_applied, 1u);

  // Another request after the switch is refused.
  auto other = b->PrepareReverse(Params(kOtherRequest));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), Code::kFailedPrecondition) << other.status().ToString();

  // A restart keeps the switched record: the claim is still answered.
  ASSERT_TRUE(reverse_->Start().ok());
  auto after_restart = b->PrepareReverse(Params());
  ASSERT_TRUE(after_restart.ok()) << after_restart.status().ToString();
  EXPECT_EQ(after_restart->claim, a->claim);

  // A record still in "adopting" although the catalog was switched (the
  // daemon stopped between the two writes): a restart completes it, and
  // keeps the store.
  auto raw = ReadReverseRecord(ReverseRecvRecordPath(state_, kVm));
  ASSERT_TRUE(raw.ok());
  auto rec = ReverseRecvRecord::Decode(*raw, state_);
  ASSERT_TRUE(rec.ok());
  rec->phase = "adopting";
  ASSERT_TRUE(WriteReverseRecord(ReverseRecvRecordPath(state_, kVm), rec->Encode()).ok());
  ASSERT_TRUE(reverse_->Start().ok());
  EXPECT_TRUE(Exists(StoreDir() + "/disks/vda.img"));
  auto completed = b->PrepareReverse(Params());
  ASSERT_TRUE(completed.ok()) << completed.status().ToString();
  EXPECT_EQ(completed->claim, a->claim);
  ExpectAdopted(ReplicationType::kPlanned);
}

TEST_F(ReverseReceiverTest, RetireClosesTheAdoptedStoreOnlyWithoutForeignHolds) {
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false, {{}, {}});
  auto b = Client("replica-b.lab");
  auto a = PrepareUntilDone(*b, Params());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b->GetReplicaStatus(kVm, 0).ok());  // opened by the manager
  EXPECT_TRUE(Exists(StoreDir() + "/staging"));
  auto held = manager_->AcquireLocal(kVm);
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  Status busy = manager_->Retire(kVm);
  EXPECT_EQ(busy.code(), Code::kFailedPrecondition) << busy.ToString();
  ASSERT_TRUE(manager_->Retire(kVm, /*holds_of_caller=*/1).ok());
  EXPECT_FALSE(Exists(StoreDir() + "/staging"));
  for (const auto& d : kDisks) EXPECT_TRUE(Exists(StoreDir() + "/disks/" + d.name + ".img")) << d.name;
  // Closed: the store's lock is free again.
  auto reopened = ReplicaStore::Open(StoreDir(), nullptr, ReplicaStoreOptions{});
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ((*reopened)->latest_sequence(), 1u);
  reopened->reset();
  EXPECT_TRUE(manager_->Retire(kVm).ok());  // not open: OK
}

TEST_F(ReverseReceiverTest, ASecondReverseAfterTheVmBecamePrimaryAgainAdoptsOverTheOldStore) {
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false, {{}, {}});
  auto b = Client("replica-b.lab");
  auto first = PrepareUntilDone(*b, Params());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(b->GetReplicaStatus(kVm, 0).ok());  // the manager holds the store open
  // Later the VM is this host's primary again (the round trip), in 4 after
  // another planned failover, with new data on its images.
  auto w = RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0x77 5M 64k", def_.disks[0].path});
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  auto vm = catalog_->GetVm(kVm);
  ASSERT_TRUE(vm.ok() && *vm);
  VmRecord v = **vm;
  v.mode = ReplicationMode::kPrimary;
  ASSERT_TRUE(catalog_->PutVm(v).ok());
  ASSERT_TRUE(catalog_->PutDisks(kVm, ToDiskRecords(def_)).ok());
  RelationshipRecord rel;
  rel.vm_id = kVm;
  rel.local_mode = ReplicationMode::kPrimary;
  rel.state = ReplicationState::kSyncedReplicationComplete;
  rel.settings = Settings("replica-b.lab");
  rel.generation_id = kGenerationHex;
  rel.sequence = 9;
  rel.last_replication_ms = kLastReplicationMs;
  ASSERT_TRUE(catalog_->PutRelationship(rel).ok());

  auto second = PrepareUntilDone(*b, Params(kOtherRequest));
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->claim.common_sequence, 9u);
  EXPECT_EQ(second->status.latest_applied, 1u);
  auto c = RunCommand({"qemu-img", "compare", "-f", "raw", StoreDir() + "/disks/vda.img", "-F", "qcow2",
                       def_.disks[0].path});
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  auto points = catalog_->ListRecoveryPoints(kVm);
  ASSERT_TRUE(points.ok());
  EXPECT_EQ(points->size(), 1u);
}

TEST_F(ReverseReceiverTest, LostTrackingMakesEveryBlockACandidate) {
  MakePrimaryVm(ReplicationState::kReplicating, /*lose_tracking=*/true, {{{1 * kMiB, 4096}}, {}});
  auto b = Client("replica-b.lab");
  // A failback (purpose 2) from an unplanned failover: job type 124.
  PrepareReverseParams p = Params();
  p.purpose = 2;
  auto started = b->PrepareReverse(p);
  ASSERT_TRUE(started.ok()) << started.status().ToString();
  ASSERT_FALSE(started->done);
  auto job = jobs_->Get(started->job_id);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  EXPECT_EQ(job->type, JobType::kFailback);
  auto a = PrepareUntilDone(*b, p);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_FALSE(a->claim.tracking_intact);
  EXPECT_EQ(a->claim.candidate_bytes, 12 * kMiB);
  EXPECT_EQ(a->claim.common_sequence, kCommonSequence);
  EXPECT_EQ(a->status.latest_applied, 1u);
  ExpectAdopted(ReplicationType::kRegular);
}

TEST_F(ReverseReceiverTest, RefusesWrongCallerRunningVmAndOtherDisks) {
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false, {{}, {}});

  // Hello offers the feature.
  {
    auto stub = v1::ReplicaPeer::NewStub(service::MakeSecureChannel("127.0.0.1", port_, Identity("replica-b.lab")));
    grpc::ClientContext ctx;
    v1::HelloRequest req;
    req.set_protocol_version(1);
    req.add_features(kReverseFeature);
    v1::HelloResponse resp;
    ASSERT_TRUE(stub->Hello(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.features_size(), 1);
    EXPECT_EQ(resp.features(0), kReverseFeature);
  }

  // Authorised as a primary of this replica server, but not the VM's replica.
  auto intruder = Client("intruder.lab");
  auto denied = intruder->PrepareReverse(Params());
  ASSERT_FALSE(denied.ok());
  EXPECT_EQ(denied.status().code(), Code::kPermissionDenied) << denied.status().ToString();

  auto b = Client("replica-b.lab");
  PrepareReverseParams other_disks = Params();
  other_disks.disks[1].size += 65536;
  auto bad = b->PrepareReverse(other_disks);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument) << bad.status().ToString();
  other_disks = Params();
  other_disks.disks[0].name = "sda";
  bad = b->PrepareReverse(other_disks);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument) << bad.status().ToString();

  // The VM "runs": a QEMU process answers on its monitor and holds its images.
  {
    const std::string dir = root_ + "/live";
    ASSERT_TRUE(MakeDirs(dir, 0700).ok());
    QsdOptions o;
    o.run_dir = dir;
    o.nbd_server = false;
    for (const auto& d : def_.disks) o.disks.push_back(QsdDisk{d.name, d.path, d.format, false});
    QsdProcess qsd(o);
    ASSERT_TRUE(qsd.Start().ok());
    def_.qmp_socket = qsd.qmp_socket();
    auto vm = catalog_->GetVm(kVm);
    ASSERT_TRUE(vm.ok() && *vm);
    VmRecord v = **vm;
    v.definition_json = def_.ToJson().dump();
    ASSERT_TRUE(catalog_->PutVm(v).ok());
    auto running = b->PrepareReverse(Params());
    ASSERT_FALSE(running.ok());
    EXPECT_EQ(running.status().code(), Code::kFailedPrecondition) << running.status().ToString();
    EXPECT_NE(running.status().message().find("shut it down"), std::string::npos) << running.status().ToString();
    ASSERT_TRUE(qsd.Stop().ok());
  }
  // Nothing was changed by the refusals.
  auto rel = catalog_->GetRelationship(kVm, 0);
  ASSERT_TRUE(rel.ok() && *rel);
  EXPECT_EQ((*rel)->local_mode, ReplicationMode::kPrimary);
  EXPECT_EQ((*rel)->state, ReplicationState::kSyncedReplicationComplete);
  EXPECT_FALSE(Exists(StoreDir()));
  EXPECT_FALSE(Exists(ReverseRecvRecordPath(state_, kVm)));

  // A caller without a certificate entry on A at all.
  ASSERT_TRUE(catalog_->RemoveAuthorizationEntry("intruder.lab").ok());
  auto unknown = intruder->PrepareReverse(Params());
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), Code::kPermissionDenied) << unknown.status().ToString();
}

TEST_F(ReverseReceiverTest, AJobThatFailsBeforeTheSwitchIsUndone) {
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false, {{}, {}});
  const std::string moved = def_.disks[1].path + ".away";
  ASSERT_EQ(::rename(def_.disks[1].path.c_str(), moved.c_str()), 0);  // the inspection cannot open it
  auto b = Client("replica-b.lab");
  auto failed = PrepareUntilDone(*b, Params());
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find("job failed"), std::string::npos) << failed.status().ToString();
  auto rel = catalog_->GetRelationship(kVm, 0);
  ASSERT_TRUE(rel.ok() && *rel);
  EXPECT_EQ((*rel)->local_mode, ReplicationMode::kPrimary);
  EXPECT_EQ((*rel)->state, ReplicationState::kSyncedReplicationComplete);
  EXPECT_FALSE(Exists(ReverseRecvRecordPath(state_, kVm)));
  EXPECT_FALSE(Exists(ReverseAcandPath(state_, kVm)));
  EXPECT_FALSE(Exists(StoreDir()));
  // The same request answers the job's error.
  auto same = b->PrepareReverse(Params());
  ASSERT_FALSE(same.ok());
  EXPECT_EQ(same.status().code(), Code::kNotFound) << same.status().ToString();
  EXPECT_NE(same.status().message().find("vdb"), std::string::npos) << same.status().ToString();
  // The image back: a new request starts over and succeeds.
  ASSERT_EQ(::rename(moved.c_str(), def_.disks[1].path.c_str()), 0);
  auto a = PrepareUntilDone(*b, Params(kOtherRequest));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ExpectAdopted(ReplicationType::kPlanned);
}

TEST_F(ReverseReceiverTest, RestartUndoesAReverseThatDidNotSwitch) {
  MakePrimaryVm(ReplicationState::kSyncedReplicationComplete, /*lose_tracking=*/false, {{}, {}});
  // A record left in "adopting" by a daemon that stopped: a store dir it
  // created, an acand file.
  ASSERT_TRUE(MakeDirs(StoreDir() + "/disks", 0700).ok());
  ASSERT_TRUE(MakeDirs(state_ + "/reverse", 0700).ok());
  ASSERT_TRUE(WriteFileAtomic(ReverseAcandPath(state_, kVm), "x", 0600).ok());
  ReverseRecvRecord rec;
  rec.purpose = "reverse";
  rec.vm_id = kVm;
  rec.request_id = kRequest;
  rec.phase = "adopting";
  rec.caller_names = {"replica-b.lab"};
  rec.claim = ReverseClaim{Generation(), kCommonSequence, true, 0, 0};
  rec.store_dir = StoreDir();
  rec.created_dir = true;
  rec.acand_file = ReverseAcandPath(state_, kVm);
  ASSERT_TRUE(WriteReverseRecord(ReverseRecvRecordPath(state_, kVm), rec.Encode()).ok());
  ASSERT_TRUE(reverse_->Start().ok());
  EXPECT_FALSE(Exists(StoreDir()));
  EXPECT_FALSE(Exists(ReverseAcandPath(state_, kVm)));
  EXPECT_FALSE(Exists(ReverseRecvRecordPath(state_, kVm)));
  // The caller's retry starts over and succeeds.
  auto b = Client("replica-b.lab");
  auto a = PrepareUntilDone(*b, Params());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->claim.candidate_bytes, 0u);
  ExpectAdopted(ReplicationType::kPlanned);
}

}  // namespace
}  // namespace vmreplica
