// RunReverseSync end to end (docs/failover.md section 12). "A", the old
// primary whose disks became a replica store at point 1, runs in process:
// a real catalog, ReplicaManager and PeerService behind gRPC with mutual
// TLS on 127.0.0.1 (lab PKI). "B" is a raw file per disk under a qcow2
// wrapper made by MakeDiskWrapper (bitmap vmr-<vm>-g1), written with
// qemu-io and served by the qemu-storage-daemon that AttachVmImages starts
// (the VM's QMP socket does not exist: its QEMU is off). The expected
// bytes are computed here from the files, never by the code under test.
#include "vmreplica/reverse_sync.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "launcher/subprocess.h"
#include "service/peer_service.h"
#include "service/tls.h"
#include "vmreplica/catalog.h"
#include "vmreplica/security.h"
#include "vmreplica/tracker.h"
#include "vmreplica/transfer.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

const char* kVm = "3c0d7e52-91aa-4b8e-b6f0-5d2c8e7a1f04";
// 128 and 64 blocks of 64 KiB: room for candidate runs more than 1 MiB apart.
const std::vector<ReplicaDisk> kDisks = {{"vda", 8 << 20}, {"vdb", 4 << 20}};
constexpr uint64_t kBlock = 64 << 10;
constexpr uint64_t kMergeGap = 1 << 20;  // A merges runs closer than this (docs/protocol.md)

std::string Bitmap() { return std::string("vmr-") + kVm + "-g1"; }

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string Hex(const GenerationId& g) {
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (uint8_t b : g) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

// Runs a tool; the test fails with its output when it is missing or fails.
std::string RunTool(const std::vector<std::string>& argv) {
  auto c = launcher_internal::RunCapture(argv);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  if (!c.ok()) return "";
  EXPECT_NE(c->exit_code, 127) << argv[0] << " is not installed (package qemu-utils)";
  EXPECT_EQ(c->exit_code, 0) << argv[0] << " failed: " << c->output;
  return c->output;
}

class ReverseSyncTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-rs-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    pki_ = root_ + "/pki";
    storage_ = root_ + "/storage";
    bdir_ = root_ + "/b";
    run_dir_ = root_ + "/run";
    for (const auto& d : {pki_, storage_, bdir_, run_dir_, root_ + "/state/reverse"}) fs::create_directories(d);
    ASSERT_TRUE(security::CreateLabCa(pki_ + "/ca.crt", pki_ + "/ca.key", "reverse sync test CA", 2).ok());
    for (const std::string name : {"old-primary.lab", "new-primary.lab"}) {
      std::vector<std::string> sans = {name};
      if (name == "old-primary.lab") sans.push_back("127.0.0.1");
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
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"new-primary.lab", storage_, "tg-b"}).ok());
    env_.catalog = catalog_.get();
    env_.host_name = "old-primary.lab";
    env_.identity = Identity("old-primary.lab");

    ReplicaManagerOptions mo;
    mo.state_dir = root_ + "/state";
    manager_ = std::make_unique<ReplicaManager>(catalog_.get(), mo);
    peer_ = std::make_unique<service::PeerService>(&env_, manager_.get());
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", service::MakeServerCredentials(env_.identity), &port);
    b.RegisterService(peer_.get());
    b.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    port_ = static_cast<uint16_t>(port);

    std::random_device rd;
    for (auto& x : generation_) x = static_cast<uint8_t>(rd());
    // The content both sides share at the common point: random bytes, so
    // every block differs from zeros and from every other block.
    std::mt19937_64 rng(20261124);
    for (const auto& d : kDisks) {
      std::string img(d.size, '\0');
      for (auto& c : img) c = static_cast<char>(rng());
      common_.push_back(std::move(img));
    }
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
    server_.reset();
    peer_.reset();
    manager_.reset();
    catalog_.reset();
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  security::TlsIdentity Identity(const std::string& name) {
    auto id = service::LoadIdentity(pki_ + "/ca.crt", pki_ + "/" + name + ".crt", pki_ + "/" + name + ".key");
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    return id.ok() ? *id : security::TlsIdentity{};
  }

  std::shared_ptr<grpc::Channel> Channel() {
    return service::MakeSecureChannel("127.0.0.1", port_, Identity("new-primary.lab"));
  }

  // A as the adoption leaves it (docs/failover.md 11): its store holds
  // `images` as point 1 of generation G, state 2, expecting log 2. No public
  // path of the data plane adopts, so log 1 carries the images and the
  // relationship is put back to state 2 in the catalog, as Adopt writes it.
  void MakeA(const std::vector<std::string>& images) {
    ReplicaClient client(Channel());
    CreateReplicaParams p;
    p.vm_id = kVm;
    p.vm_name = "web01";
    p.definition_json = R"({"memory_mib":256})";
    p.disks = kDisks;
    p.settings.recovery_connection_point = "old-primary.lab";
    p.settings.recovery_server_port = 443;
    p.settings.certificate_thumbprint = std::string(40, 'a');
    p.settings.recovery_history = 2;
    auto created = client.CreateReplica(p);
    ASSERT_TRUE(created.ok()) << created.status().ToString();
    std::vector<DeltaRecord> recs;
    for (uint32_t d = 0; d < kDisks.size(); ++d) {
      for (uint64_t off = 0; off < kDisks[d].size; off += 1 << 20) {
        recs.push_back(DataRecord(d, off, images[d].substr(off, 1 << 20)));
      }
    }
    VectorDeltaSource src(std::move(recs));
    DeltaInfo info;
    info.vm_id = kVm;
    info.sequence = 1;
    info.new_generation = generation_;
    info.cut_time_unix_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count() -
        60000);
    info.kind = ReplicationType::kPlanned;
    info.initial = true;
    auto sent = client.SendDelta(info, src, SendOptions{});
    ASSERT_TRUE(sent.ok()) << sent.status().ToString();
    ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
    auto rel = catalog_->GetRelationship(kVm, 0);
    ASSERT_TRUE(rel.ok() && *rel);
    (*rel)->state = ReplicationState::kWaitingToCompleteInitialReplication;
    ASSERT_TRUE(catalog_->PutRelationship(**rel).ok());
    auto st = client.GetReplicaStatus(kVm, 0);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    ASSERT_EQ(st->latest_applied, 1u);
    ASSERT_EQ(st->expected_sequence, 2u);
    ASSERT_EQ(st->state, ReplicationState::kWaitingToCompleteInitialReplication);
    for (uint32_t d = 0; d < kDisks.size(); ++d) ASSERT_TRUE(ReadFile(AFile(d)) == images[d]) << AFile(d);
    // A's candidates as an adoption leaves them: none (a test with A's own
    // changes writes its own file; without one A hashes every block).
    const std::string acand = root_ + "/state/reverse/" + kVm + ".acand";
    if (!fs::exists(acand)) {
      ASSERT_TRUE(
          WriteRangeListFile(acand, kRangeListCandidates, static_cast<uint32_t>(kDisks.size()), SinceList{}).ok());
    }
  }

  std::string AFile(uint32_t d) const { return storage_ + "/" + kVm + "/disks/" + kDisks[d].name + ".img"; }
  std::string BRaw(uint32_t d) const { return bdir_ + "/" + kDisks[d].name + ".img"; }
  std::string BWrapper(uint32_t d) const { return bdir_ + "/" + kDisks[d].name + ".qcow2"; }

  // B's disks: raw files holding `images` under wrappers with the bitmap.
  void MakeB(const std::vector<std::string>& images) {
    for (uint32_t d = 0; d < kDisks.size(); ++d) {
      WriteFile(BRaw(d), images[d]);
      Status s = MakeDiskWrapper(BRaw(d), BWrapper(d), kDisks[d].size, Bitmap());
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }

  // B's VM: kind qmp whose monitor socket does not exist (QEMU is off).
  VmDefinition BDefinition() const {
    VmDefinition def;
    def.name = "web01";
    def.uuid = kVm;
    def.memory_mib = 256;
    def.vcpus = 1;
    for (uint32_t d = 0; d < kDisks.size(); ++d) {
      VmDiskSpec s;
      s.name = kDisks[d].name;
      s.node_name = "vmr-commit-" + kDisks[d].name;
      s.path = BWrapper(d);
      s.format = "qcow2";
      s.size_bytes = kDisks[d].size;
      def.disks.push_back(s);
    }
    def.kind = VmSourceKind::kQmp;
    def.qmp_socket = root_ + "/no-qemu.qmp";
    return def;
  }

  // B's since file for common point C = 4 of generation G: points 3..5.
  SinceList Since(std::vector<RangeEntry> entries = {}) const {
    SinceList s;
    s.base_sequence = 3;
    s.replicated_sequence = 5;
    s.generation = generation_;
    s.points = {3, 4, 5};
    s.entries = std::move(entries);
    return s;
  }

  ReverseClaim Claim(bool intact, uint64_t candidate_bytes) const {
    ReverseClaim c;
    c.generation = generation_;
    c.common_sequence = 4;
    c.tracking_intact = intact;
    c.candidate_bytes = candidate_bytes;
    return c;
  }

  ReverseSyncParams Params(ReverseClaim claim, std::optional<SinceList> since) {
    ReverseSyncParams p;
    p.vm_id = kVm;
    p.definition = BDefinition();
    p.disks = {"vda", "vdb"};
    p.run_dir = run_dir_;
    p.channel = Channel();
    p.claim = claim;
    p.since = std::move(since);
    return p;
  }

  // Writes through B's wrapper with qemu-io (the bitmap records it).
  void QemuIo(uint32_t d, const std::string& command) {
    RunTool({"qemu-io", "-f", "qcow2", BWrapper(d), "-c", command});
  }

  // The names of the bitmaps of B's wrapper of disk d.
  std::set<std::string> WrapperBitmaps(uint32_t d) {
    const std::string out = RunTool({"qemu-img", "info", "-U", "--output=json", BWrapper(d)});
    std::set<std::string> names;
    auto j = nlohmann::json::parse(out, nullptr, false);
    if (j.is_discarded()) return names;
    const auto& data = j["format-specific"]["data"];
    if (data.contains("bitmaps")) {
      for (const auto& b : data["bitmaps"]) names.insert(b.value("name", ""));
    }
    return names;
  }

  // After the sync: A applied log 2 (state 3, latest 2) and its files equal
  // B's raw files byte for byte.
  void ExpectAEqualsB() {
    ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
    auto st = ReplicaClient(Channel()).GetReplicaStatus(kVm, 0);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    EXPECT_EQ(st->latest_applied, 2u);
    EXPECT_EQ(st->expected_sequence, 3u);
    EXPECT_EQ(st->state, ReplicationState::kReplicating);
    for (uint32_t d = 0; d < kDisks.size(); ++d) {
      const std::string a = ReadFile(AFile(d)), b = ReadFile(BRaw(d));
      ASSERT_EQ(a.size(), kDisks[d].size) << AFile(d);
      ASSERT_EQ(b.size(), kDisks[d].size) << BRaw(d);
      EXPECT_TRUE(a == b) << "disk " << kDisks[d].name << ": A's store file differs from B's raw file";
    }
  }

  // The generation of A's point `seq` in A's catalog.
  std::string PointGeneration(uint64_t seq) {
    auto points = catalog_->ListRecoveryPoints(kVm);
    EXPECT_TRUE(points.ok()) << points.status().ToString();
    if (!points.ok()) return "";
    for (const auto& p : *points) {
      if (p.sequence == seq) return p.generation_id;
    }
    return "(no point " + std::to_string(seq) + ")";
  }

  std::string root_, pki_, storage_, bdir_, run_dir_;
  std::unique_ptr<Catalog> catalog_;
  service::ServiceEnv env_;
  std::unique_ptr<ReplicaManager> manager_;
  std::unique_ptr<service::PeerService> peer_;
  std::unique_ptr<grpc::Server> server_;
  uint16_t port_ = 0;
  GenerationId generation_{};
  std::vector<std::string> common_;
};

// A planned failover whose failover VM wrote nothing: both sides' candidates
// are empty, nothing is hashed and log 2 has no record; the relationship
// keeps G.
TEST_F(ReverseSyncTest, NothingChangedSendsAnEmptyLogThatKeepsTheGeneration) {
  MakeA(common_);
  MakeB(common_);
  // Before the sync A waits at point 1: nothing was delivered.
  auto before = ReverseSyncDelivered(Channel(), kVm);
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  EXPECT_FALSE(before->has_value());
  auto r = RunReverseSync(Params(Claim(true, 0), Since()));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->sequence, 2u);
  EXPECT_EQ(r->records, 0u);
  EXPECT_EQ(r->data_bytes, 0u);
  EXPECT_EQ(r->zero_bytes, 0u);
  EXPECT_EQ(r->candidate_bytes, 0u);
  EXPECT_FALSE(r->whole_disks);
  EXPECT_EQ(Hex(r->generation), Hex(generation_));
  EXPECT_GT(r->cut_time_ms, 0);
  ExpectAEqualsB();
  EXPECT_EQ(PointGeneration(2), Hex(generation_));
  // The cut was committed: generation 2 of the relationship's tracker records.
  for (uint32_t d = 0; d < kDisks.size(); ++d) {
    EXPECT_EQ(WrapperBitmaps(d), std::set<std::string>{std::string("vmr-") + kVm + "-g2"}) << "disk " << d;
  }
  // The relationship's tracker (as the engine makes it) adopts the wrappers'
  // bitmaps as they are left: generation 2, consistent and recording.
  {
    auto attached = AttachVmImages(BDefinition(), run_dir_);
    ASSERT_TRUE(attached.ok()) << attached.status().ToString();
    ChangeTracker tracker((*attached)->qmp(), kVm, (*attached)->tracked_disks());
    auto rec = tracker.Reconcile();
    ASSERT_TRUE(rec.ok()) << rec.status().ToString();
    EXPECT_EQ(rec->generation, 2u);
    EXPECT_TRUE(tracker.CheckTracking().ok()) << tracker.CheckTracking().ToString();
  }
  // Once A applied log 2, a caller that lost the report finishes from A's
  // answer: its sequence and the generation of its point 2.
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  auto after = ReverseSyncDelivered(Channel(), kVm);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  ASSERT_TRUE(after->has_value());
  EXPECT_EQ((*after)->sequence, 2u);
  EXPECT_EQ(Hex((*after)->generation), Hex(generation_));
  // A second sync finds A past its adopted point and says what it found.
  auto again = RunReverseSync(Params(Claim(true, 0), Since()));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), Code::kFailedPrecondition) << again.status().ToString();
  EXPECT_NE(again.status().message().find("latest point 2"), std::string::npos) << again.status().ToString();
}

// An unplanned failover: A wrote after the common point (its candidates
// file), B wrote through its wrappers (bitmap) and before the commit (since
// file). Only candidate blocks are hashed, only differing ones travel, and
// A ends up equal to B.
TEST_F(ReverseSyncTest, OnlyDifferingCandidateBlocksAreSent) {
  std::vector<std::string> a = common_, b = common_;
  auto put = [](std::string& img, uint64_t off, const std::string& bytes) {
    std::copy(bytes.begin(), bytes.end(), img.begin() + static_cast<std::ptrdiff_t>(off));
  };
  // A's own changes (in its acand file), and one candidate range whose
  // bytes A rewrote unchanged (hashed, equal, not sent).
  put(a[0], 1 << 20, std::string(4096, 'A'));                   // vda block 16
  put(a[0], (3 << 20) + kBlock, std::string(2 * kBlock, 'B'));  // vda blocks 49, 50
  put(a[1], 512 << 10, std::string(8192, 'C'));                 // vdb block 8
  SinceList acand;
  acand.entries = {{0, 1 << 20, 4096, 0},
                   {0, (3 << 20) + kBlock, 2 * kBlock, 0},
                   {0, 6 << 20, kBlock, 0},  // vda block 96: equal on both sides
                   {1, 512 << 10, 8192, 0}};
  ASSERT_TRUE(WriteRangeListFile(root_ + "/state/reverse/" + kVm + ".acand", kRangeListCandidates, 2, acand).ok());
  // B's history before the wrappers (the since file): vda block 80 written
  // after point 4; vdb [2 MiB, +4 KiB) labelled 3, below C = 4 (equal bytes
  // on both sides, so not a candidate of B).
  put(b[0], 5 << 20, std::string(4096, 'S'));
  MakeA(a);
  MakeB(b);
  // B's writes through the wrappers after the commit.
  QemuIo(0, "write -P 0x5a 2M 64k");        // vda block 32
  QemuIo(0, "write -P 0x33 1056768 8192");  // vda [1 MiB + 32 KiB, +8 KiB): block 16, as A's change
  QemuIo(1, "write -z 1M 64k");             // vdb block 16: zeros (a zero record)
  const std::string b0 = ReadFile(BRaw(0)), b1 = ReadFile(BRaw(1));
  ASSERT_EQ(b0.substr(2 << 20, kBlock), std::string(kBlock, '\x5a'));
  ASSERT_EQ(b1.substr(1 << 20, kBlock), std::string(kBlock, '\0'));
  const std::vector<std::string> b_now = {b0, b1};

  const std::vector<RangeEntry> since_entries = {{0, 5 << 20, 4096, 4}, {1, 2 << 20, 4096, 3}};
  auto r = RunReverseSync(Params(Claim(true, 3 * kBlock + 4096 + 8192), Since(since_entries)));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->whole_disks);
  EXPECT_NE(Hex(r->generation), Hex(generation_)) << "records were sent: a new generation";

  // Expected, computed here: the candidate blocks of both sides per disk,
  // runs closer than 1 MiB merged (what A hashes, and B reads); within
  // them, runs of blocks whose bytes differ are sent (zeros as zero records).
  const std::map<uint32_t, std::vector<uint64_t>> cand_blocks = {
      {0, {16, 49, 50, 96, 32, 80}},  // A's acand; B's bitmap (16, 32); B's since (80)
      {1, {8, 16}}};                  // A's acand; B's bitmap
  uint64_t want_candidate = 0, want_data = 0, want_zero = 0;
  for (const auto& [d, blocks_in] : cand_blocks) {
    std::set<uint64_t> blocks(blocks_in.begin(), blocks_in.end());
    std::vector<std::pair<uint64_t, uint64_t>> runs;  // [first, end) in blocks
    for (uint64_t blk : blocks) {
      if (!runs.empty() && (blk - runs.back().second) * kBlock < kMergeGap) {
        runs.back().second = blk + 1;
      } else {
        runs.push_back({blk, blk + 1});
      }
    }
    for (const auto& [first, end] : runs) {
      want_candidate += (end - first) * kBlock;
      for (uint64_t blk = first; blk < end;) {
        auto differs = [&](uint64_t k) { return a[d].compare(k * kBlock, kBlock, b_now[d], k * kBlock, kBlock) != 0; };
        if (!differs(blk)) {
          ++blk;
          continue;
        }
        uint64_t stop = blk;
        bool zeros = true;
        for (; stop < end && differs(stop); ++stop) {
          zeros = zeros && b_now[d].compare(stop * kBlock, kBlock, std::string(kBlock, '\0')) == 0;
        }
        (zeros ? want_zero : want_data) += (stop - blk) * kBlock;
        blk = stop;
      }
    }
  }
  EXPECT_EQ(r->candidate_bytes, want_candidate);
  EXPECT_EQ(r->data_bytes, want_data);
  EXPECT_EQ(r->zero_bytes, want_zero);
  EXPECT_EQ(want_data, 6 * kBlock);  // vda 16, 32, 49, 50, 80 and vdb 8
  EXPECT_EQ(want_zero, kBlock);      // vdb 16
  EXPECT_LT(r->data_bytes + r->zero_bytes, r->candidate_bytes) << "equal candidate blocks were sent";
  ExpectAEqualsB();
  EXPECT_EQ(PointGeneration(2), Hex(r->generation));
}

// Tracking lost on B (the wrapper has no bitmap): every block of B is a
// candidate, and A still ends up equal to B. Tracking starts afresh.
TEST_F(ReverseSyncTest, TrackingLostOnBComparesWholeDisks) {
  MakeA(common_);
  MakeB(common_);
  for (uint32_t d = 0; d < kDisks.size(); ++d) RunTool({"qemu-img", "bitmap", "--remove", BWrapper(d), Bitmap()});
  // Written while nothing tracked them.
  QemuIo(0, "write -P 0x71 7M 12k");
  QemuIo(1, "write -P 0x72 100k 4k");
  auto r = RunReverseSync(Params(Claim(true, 0), Since()));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->whole_disks);
  EXPECT_EQ(r->candidate_bytes, kDisks[0].size + kDisks[1].size);
  EXPECT_EQ(r->data_bytes, 2 * kBlock);  // vda block 112, vdb block 1
  EXPECT_EQ(r->zero_bytes, 0u);
  ExpectAEqualsB();
  for (uint32_t d = 0; d < kDisks.size(); ++d) {
    const auto names = WrapperBitmaps(d);
    EXPECT_EQ(names.size(), 1u) << "disk " << d;
    EXPECT_EQ(names.count(Bitmap()), 0u) << "disk " << d << ": the cut's bitmap was not committed";
  }
}

// No since file (B's history unknown): every block, whatever the bitmap says.
TEST_F(ReverseSyncTest, NoSinceFileComparesWholeDisks) {
  std::vector<std::string> b = common_;
  std::fill(b[1].begin() + (3 << 20), b[1].begin() + (3 << 20) + 4096, 'h');  // before the wrapper: untracked
  MakeA(common_);
  MakeB(b);
  auto r = RunReverseSync(Params(Claim(true, 0), std::nullopt));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->whole_disks);
  EXPECT_EQ(r->candidate_bytes, kDisks[0].size + kDisks[1].size);
  EXPECT_EQ(r->data_bytes, kBlock);
  ExpectAEqualsB();
}

// A since file of another history than A's claim cannot say what B wrote
// after the common point: every block.
TEST_F(ReverseSyncTest, SinceFileOfAnotherGenerationComparesWholeDisks) {
  std::vector<std::string> b = common_;
  std::fill(b[0].begin() + (4 << 20), b[0].begin() + (4 << 20) + 4096, 'g');  // untracked
  MakeA(common_);
  MakeB(b);
  SinceList since = Since({{0, 4 << 20, 4096, 5}});
  since.generation[0] ^= 1;
  auto r = RunReverseSync(Params(Claim(true, 0), since));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->whole_disks);
  EXPECT_EQ(r->candidate_bytes, kDisks[0].size + kDisks[1].size);
  EXPECT_EQ(r->data_bytes, kBlock);
  ExpectAEqualsB();
}

// A's tracking was lost (its claim says so): A hashes every block and only
// the block that differs travels, though B's own candidates are empty.
TEST_F(ReverseSyncTest, TrackingLostOnAComparesWholeDisks) {
  std::vector<std::string> a = common_;
  std::fill(a[1].begin() + (1 << 20), a[1].begin() + (1 << 20) + 512, 'x');
  MakeA(a);
  MakeB(common_);
  auto r = RunReverseSync(Params(Claim(false, 0), Since()));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->whole_disks);
  EXPECT_EQ(r->candidate_bytes, kDisks[0].size + kDisks[1].size);
  EXPECT_EQ(r->data_bytes, kBlock);
  ExpectAEqualsB();
}

// A refuses log 2 (its base generation is not A's): the cut is aborted,
// A keeps its adopted point, and B's bitmap still holds its writes, so the
// next sync (with the right claim) sends them.
TEST_F(ReverseSyncTest, RefusedLogAbortsTheCutAndLosesNoChange) {
  MakeA(common_);
  MakeB(common_);
  QemuIo(0, "write -P 0x44 3M 4k");  // only in B's bitmap: the since file lists nothing
  ReverseClaim wrong = Claim(true, 0);
  wrong.generation[15] ^= 0x80;
  SinceList since = Since();
  since.generation = wrong.generation;
  auto r = RunReverseSync(Params(wrong, since));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("resynchronization required"), std::string::npos) << r.status().ToString();
  auto st = ReplicaClient(Channel()).GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 1u);
  EXPECT_EQ(st->expected_sequence, 2u);
  EXPECT_EQ(st->state, ReplicationState::kWaitingToCompleteInitialReplication);

  auto again = RunReverseSync(Params(Claim(true, 0), Since()));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_FALSE(again->whole_disks);
  EXPECT_EQ(again->candidate_bytes, kBlock);
  EXPECT_EQ(again->data_bytes, kBlock);
  ExpectAEqualsB();
}

// B's VM runs: a qemu-storage-daemon (standing in for its QEMU) holds the
// wrappers with node names vmr-commit-<disk> and a QMP monitor; the sync
// attaches to it over QMP (AttachVm) and cuts while it runs. Writes made
// through it before the sync are in the bitmap and reach A.
TEST_F(ReverseSyncTest, RunningVmIsSyncedThroughItsMonitor) {
  MakeA(common_);
  MakeB(common_);
  const std::string qmp = root_ + "/vm.qmp", nbd = root_ + "/vm.nbd";
  // The NBD server comes before the exports on QEMU's command line.
  std::vector<std::string> argv = {"qemu-storage-daemon", "--nbd-server", "addr.type=unix,addr.path=" + nbd};
  for (uint32_t d = 0; d < kDisks.size(); ++d) {
    const std::string& n = kDisks[d].name;
    argv.push_back("--blockdev");
    argv.push_back("driver=file,node-name=file-" + n + ",filename=" + BWrapper(d));
    argv.push_back("--blockdev");
    argv.push_back("driver=qcow2,node-name=vmr-commit-" + n + ",file=file-" + n);
    argv.push_back("--export");
    argv.push_back("type=nbd,id=guest-" + n + ",node-name=vmr-commit-" + n + ",name=" + n + ",writable=on");
  }
  argv.insert(argv.end(),
              {"--chardev", "socket,path=" + qmp + ",server=on,wait=off,id=mon0", "--monitor", "chardev=mon0"});
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  pid_t pid = -1;
  ASSERT_EQ(::posix_spawnp(&pid, "qemu-storage-daemon", nullptr, nullptr, cargv.data(), environ), 0)
      << "qemu-storage-daemon cannot be started (package qemu-system-common)";
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      if (pid <= 0) return;
      ::kill(pid, SIGTERM);
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
    // A clean stop: QEMU stores the persistent bitmaps.
    bool Stop() {
      if (::kill(pid, SIGTERM) != 0) return false;
      int status = 0;
      const bool ok = ::waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
      pid = -1;
      return ok;
    }
  } reaper{pid};
  for (int i = 0; i < 1000 && !(fs::exists(qmp) && fs::exists(nbd)); ++i) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, WNOHANG), 0) << "qemu-storage-daemon exited";
    ::usleep(10 * 1000);  // polling for its sockets, at most 10 s
  }
  ASSERT_TRUE(fs::exists(qmp) && fs::exists(nbd)) << "qemu-storage-daemon did not open its sockets";
  // The guest writes through the running VM.
  RunTool({"qemu-io", "-f", "raw", "nbd+unix:///vda?socket=" + nbd, "-c", "write -P 0x66 4M 64k"});
  RunTool({"qemu-io", "-f", "raw", "nbd+unix:///vdb?socket=" + nbd, "-c", "write -P 0x67 0 4k"});

  auto p = Params(Claim(true, 0), Since());
  for (auto& d : p.definition.disks) d.node_name = "vmr-commit-" + d.name;
  p.definition.qmp_socket = qmp;
  p.definition.nbd_socket = nbd;
  auto r = RunReverseSync(p);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->whole_disks);
  EXPECT_EQ(r->candidate_bytes, 2 * kBlock);
  EXPECT_EQ(r->data_bytes, 2 * kBlock);
  ASSERT_TRUE(reaper.Stop()) << "qemu-storage-daemon did not stop cleanly";
  ExpectAEqualsB();
  for (uint32_t d = 0; d < kDisks.size(); ++d) {
    EXPECT_EQ(WrapperBitmaps(d), std::set<std::string>{std::string("vmr-") + kVm + "-g2"}) << "disk " << d;
  }
}

}  // namespace
}  // namespace vmreplica
