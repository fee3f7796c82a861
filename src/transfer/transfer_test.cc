// End-to-end tests of the data plane: a real PeerService + ReplicaManager
// behind a gRPC server with mutual TLS on 127.0.0.1, certificates from the
// lab PKI, a real catalog and real replica stores. Expected disk images are
// computed here from the records, independently of the code under test.
#include "vmreplica/transfer.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <iostream>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "service/peer_service.h"
#include "service/tls.h"
#include "vmreplica/reverse.h"
#include "vmreplica/security.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

const char* kVm = "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b";
const std::vector<ReplicaDisk> kDisks = {{"vda", 1 << 20}, {"vdb", 512 << 10}};

// Every file and directory under `root` (relative names), symlinks not followed.
std::set<std::string> Tree(const std::string& root) {
  std::set<std::string> out;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
    out.insert(fs::relative(it->path(), root).string());
  }
  return out;
}

class TransferTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-xfer-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    pki_ = root_ + "/pki";
    storage_ = root_ + "/storage";
    outside_ = root_ + "/outside";
    fs::create_directories(pki_);
    fs::create_directories(storage_);
    fs::create_directories(outside_);
    ASSERT_TRUE(security::CreateLabCa(pki_ + "/ca.crt", pki_ + "/ca.key", "xfer test CA", 2).ok());
    for (const std::string name : {"replica.lab", "primary-a.lab", "primary-a2.lab", "primary-b.lab", "intruder.lab"}) {
      std::vector<std::string> sans = {name};
      if (name == "replica.lab") sans.push_back("127.0.0.1");
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
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"primary-a.lab", storage_, "tg-a"}).ok());
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"primary-a2.lab", storage_, "tg-a"}).ok());
    ASSERT_TRUE(catalog_->AddAuthorizationEntry({"primary-b.lab", storage_, "tg-b"}).ok());

    env_.catalog = catalog_.get();
    env_.host_name = "replica.lab";
    env_.identity = Identity("replica.lab");
    StartServer();
  }

  void StartServer() {
    ReplicaManagerOptions mo;
    mo.state_dir = root_ + "/state";  // GetRangeHashes: <state>/reverse/<vm>.acand
    mo.apply_while_receiving = apply_while_receiving_;
    mo.apply_idle_timeout = apply_idle_timeout_;
    mo.apply_batch_bytes = apply_batch_bytes_;
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
  }

  void StopServer() {
    server_->Shutdown();
    server_.reset();
    peer_.reset();
    manager_.reset();
  }

  void TearDown() override {
    if (server_) StopServer();
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

  std::unique_ptr<v1::ReplicaPeer::Stub> RawStub(const std::string& name) {
    return v1::ReplicaPeer::NewStub(service::MakeSecureChannel("127.0.0.1", port_, Identity(name)));
  }

  static CreateReplicaParams Params(const std::string& vm_id = kVm) {
    CreateReplicaParams p;
    p.vm_id = vm_id;
    p.vm_name = "web01";
    p.definition_json = R"({"memory_mib":256})";
    p.disks = kDisks;
    p.settings.recovery_connection_point = "replica.lab";
    p.settings.recovery_server_port = 443;
    p.settings.certificate_thumbprint = std::string(40, 'a');
    p.settings.recovery_history = 2;
    return p;
  }

  static DeltaInfo Info(uint64_t seq, uint8_t gen_tag = 0) {
    DeltaInfo d;
    d.vm_id = kVm;
    d.sequence = seq;
    d.base_generation.fill(static_cast<uint8_t>(seq - 1));
    d.new_generation.fill(static_cast<uint8_t>(seq + gen_tag));
    // Recent cut times: every point stays inside the store's fine window.
    static const auto base =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch());
    d.cut_time_unix_ms = static_cast<uint64_t>(base.count()) - 60000 + seq * 1000;
    d.kind = seq % 3 == 0 ? ReplicationType::kApplicationConsistent : ReplicationType::kRegular;
    d.initial = seq == 1;
    return d;
  }

  // Random records of block-aligned extents on both disks; some large ones
  // (split by the sender), some zero ones. Applies them to `images` as the
  // expected result.
  static std::vector<DeltaRecord> RandomDelta(std::mt19937_64& rng, std::vector<std::string>& images, int count) {
    std::vector<DeltaRecord> out;
    for (int i = 0; i < count; ++i) {
      const uint32_t disk = rng() % kDisks.size();
      const uint64_t blocks = kDisks[disk].size / 4096;
      const uint64_t len_blocks = 1 + rng() % (i % 7 == 0 ? 40 : 4);
      const uint64_t start = rng() % (blocks - len_blocks + 1);
      const uint64_t off = start * 4096, len = len_blocks * 4096;
      if (rng() % 5 == 0) {
        out.push_back(ZeroRecord(disk, off, len));
        std::fill(images[disk].begin() + off, images[disk].begin() + off + len, '\0');
      } else {
        std::string data(len, '\0');
        // Compressible and incompressible data alternate.
        const bool compressible = rng() % 2 == 0;
        for (size_t k = 0; k < len; ++k) {
          data[k] = compressible ? static_cast<char>('a' + (k / 512 + i) % 26) : static_cast<char>(rng());
        }
        std::copy(data.begin(), data.end(), images[disk].begin() + off);
        out.push_back(DataRecord(disk, off, std::move(data)));
      }
    }
    return out;
  }

  static std::vector<std::string> EmptyImages() {
    std::vector<std::string> im;
    for (const auto& d : kDisks) im.emplace_back(d.size, '\0');
    return im;
  }

  // Closes the replica (RemoveReplica) and compares every point with `expected[seq]`.
  void ExpectPoints(const std::map<uint64_t, std::vector<std::string>>& expected) {
    ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
    ASSERT_TRUE(Client("primary-a.lab")->RemoveReplica(kVm, 0).ok());
    auto store = ReplicaStore::Open(storage_ + "/" + kVm, nullptr, ReplicaStoreOptions{});
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    for (const auto& [seq, images] : expected) {
      for (uint32_t d = 0; d < kDisks.size(); ++d) {
        std::string got(kDisks[d].size, '\x55');
        ASSERT_TRUE((*store)->ReadPoint(seq, d, 0, got.size(), got.data()).ok()) << "point " << seq;
        EXPECT_TRUE(got == images[d]) << "point " << seq << " disk " << kDisks[d].name << " differs";
      }
    }
  }

  // Fills both disks with random data (log 1) and waits for it; `images`
  // becomes point 1.
  void SendFullCopy(ReplicaClient& client, std::mt19937_64& rng, std::vector<std::string>& images) {
    std::vector<DeltaRecord> recs;
    for (uint32_t d = 0; d < kDisks.size(); ++d) {
      std::string data(kDisks[d].size, '\0');
      for (auto& c : data) c = static_cast<char>(rng());
      images[d] = data;
      recs.push_back(DataRecord(d, 0, std::move(data)));
    }
    VectorDeltaSource src(std::move(recs));
    auto stats = client.SendDelta(Info(1), src, SendOptions{});
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  }

  // A replica whose point 1 is both disks full of random data (`seed`),
  // and the 200-block delta 2 on top of it (not sent): expected[1],
  // expected[2] and its records.
  void PointOneAndADelta(ReplicaClient& client, uint64_t seed, std::map<uint64_t, std::vector<std::string>>& expected,
                         std::vector<DeltaRecord>& recs) {
    ASSERT_TRUE(client.CreateReplica(Params()).ok());
    std::mt19937_64 rng(seed);
    auto images = EmptyImages();
    SendFullCopy(client, rng, images);
    ASSERT_FALSE(HasFatalFailure());
    expected[1] = images;
    recs = BlockDelta(rng, images, 200);
    expected[2] = images;
  }

  // `blocks` random 4 KiB blocks of vda rewritten with random data, each
  // block once (ascending); applied to `images`.
  static std::vector<DeltaRecord> BlockDelta(std::mt19937_64& rng, std::vector<std::string>& images, int blocks) {
    const uint64_t n = kDisks[0].size / 4096;
    std::set<uint64_t> chosen;
    while (chosen.size() < static_cast<size_t>(blocks) && chosen.size() < n) chosen.insert(rng() % n);
    std::vector<DeltaRecord> out;
    for (uint64_t b : chosen) {
      std::string data(4096, '\0');
      for (auto& c : data) c = static_cast<char>(rng());
      std::copy(data.begin(), data.end(), images[0].begin() + b * 4096);
      out.push_back(DataRecord(0, b * 4096, std::move(data)));
    }
    return out;
  }

  // What this process handed to write() and pwrite() so far (wchar of
  // /proc/self/io): the replica manager runs here; gRPC's socket sends use
  // sendmsg, which wchar does not count.
  static uint64_t WrittenBytes() {
    std::ifstream in("/proc/self/io");
    std::string key;
    uint64_t value = 0;
    while (in >> key >> value) {
      if (key == "wchar:") return value;
    }
    ADD_FAILURE() << "no wchar in /proc/self/io";
    return 0;
  }

  // The raw file of disk `d` as it is now (not a point: what an apply in
  // progress or rolled back left on disk).
  std::string DiskFile(uint32_t d) {
    std::ifstream in(storage_ + "/" + kVm + "/disks/" + kDisks[d].name + ".img", std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // Polls `pred` every 10 ms for up to 10 s.
  static bool Eventually(const std::function<bool()>& pred) {
    for (int i = 0; i < 1000; ++i) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return pred();
  }

  // Restarts the server with batches of one block: a rollback then has
  // data records already written into the disks to undo.
  void UseOneBlockBatches() {
    StopServer();
    apply_batch_bytes_ = 4096;
    StartServer();
  }

  bool apply_while_receiving_ = true;
  std::chrono::milliseconds apply_idle_timeout_{120000};
  uint64_t apply_batch_bytes_ = 0;
  std::string root_, pki_, storage_, outside_;
  std::unique_ptr<Catalog> catalog_;
  service::ServiceEnv env_;
  std::unique_ptr<ReplicaManager> manager_;
  std::unique_ptr<service::PeerService> peer_;
  std::unique_ptr<grpc::Server> server_;
  uint16_t port_ = 0;
};

TEST_F(TransferTest, CreateAndSeveralDeltasGiveExactPoints) {
  auto client = Client("primary-a.lab");
  auto st = client->CreateReplica(Params());
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->expected_sequence, 1u);
  EXPECT_EQ(st->latest_applied, 0u);
  EXPECT_EQ(st->state, ReplicationState::kWaitingToCompleteInitialReplication);
  auto vm = catalog_->GetVm(kVm);
  ASSERT_TRUE(vm.ok() && *vm);
  EXPECT_EQ((*vm)->mode, ReplicationMode::kReplica);
  EXPECT_EQ((*vm)->definition_json, R"({"memory_mib":256})");

  // Idempotent for the same disks; AlreadyExists for others.
  auto again = client->CreateReplica(Params());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  auto other = Params();
  other.disks[1].size += 4096;
  EXPECT_EQ(client->CreateReplica(other).status().code(), Code::kAlreadyExists);

  std::mt19937_64 rng(42);
  auto images = EmptyImages();
  // Point 0 (the empty disks) is not kept: the initial copy is loaded
  // straight into the disks and becomes point 1 (replica_store.md 17).
  std::map<uint64_t, std::vector<std::string>> expected;
  for (uint64_t seq = 1; seq <= 4; ++seq) {
    VectorDeltaSource src(RandomDelta(rng, images, seq == 1 ? 60 : 25));
    expected[seq] = images;
    SendOptions o;
    o.compress = seq % 2 == 1;
    o.chunk_bytes = 16 << 10;
    uint64_t throttled = 0, progress = 0;
    o.throttle = [&](uint64_t b) { throttled += b; };
    o.progress = [&](uint64_t b) { progress = b; };
    auto stats = client->SendDelta(Info(seq), src, o);
    ASSERT_TRUE(stats.ok()) << "seq " << seq << ": " << stats.status().ToString();
    EXPECT_GT(stats->chunks, 1u);
    EXPECT_EQ(stats->resumed, 0u);
    EXPECT_EQ(throttled, stats->wire_bytes);
    EXPECT_EQ(progress, stats->wire_bytes);
  }
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  auto status = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(status->latest_applied, 4u);
  EXPECT_EQ(status->expected_sequence, 5u);
  EXPECT_EQ(status->state, ReplicationState::kReplicating);
  auto rel = catalog_->GetRelationship(kVm, 0);
  ASSERT_TRUE(rel.ok() && *rel);
  EXPECT_EQ((*rel)->sequence, 4u);
  EXPECT_GT((*rel)->last_apply_ms, 0);
  EXPECT_GT((*rel)->last_replication_ms, 0);
  auto points = catalog_->ListRecoveryPoints(kVm);
  ASSERT_TRUE(points.ok());
  EXPECT_EQ(points->size(), 4u);  // points 1..4, mirrored by the store

  ExpectPoints(expected);
  // Removal kept the VM and its points, dropped the relationship.
  EXPECT_TRUE(catalog_->GetVm(kVm)->has_value());
  EXPECT_FALSE(catalog_->GetRelationship(kVm, 0)->has_value());
  EXPECT_EQ(catalog_->ListRecoveryPoints(kVm)->size(), 4u);
}

// Chunks after one that did not compress are probed first: random data is
// sent raw without a whole zstd pass, and compressible data after it is
// compressed again. Both arrive intact.
TEST_F(TransferTest, IncompressibleChunksAreProbedAndCompressibleOnesStillCompressed) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(11);
  auto images = EmptyImages();
  std::vector<DeltaRecord> recs;
  // vda: 768 KiB of random data, then 256 KiB of text; 64 KiB chunks.
  std::string random(768 << 10, '\0');
  for (auto& c : random) c = static_cast<char>(rng());
  std::string text(256 << 10, '\0');
  for (size_t k = 0; k < text.size(); ++k) text[k] = static_cast<char>('a' + (k / 64) % 26);
  std::copy(random.begin(), random.end(), images[0].begin());
  std::copy(text.begin(), text.end(), images[0].begin() + random.size());
  recs.push_back(DataRecord(0, 0, random));
  recs.push_back(DataRecord(0, random.size(), text));
  VectorDeltaSource src(std::move(recs));
  SendOptions o;
  o.compress = true;
  o.chunk_bytes = 64 << 10;
  auto stats = client->SendDelta(Info(1), src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->chunks, 16u);
  // The first random chunk was compressed whole (and sent raw); the 11
  // after it only probed. The text's chunks were compressed.
  EXPECT_EQ(stats->compression_skipped, 11u);
  EXPECT_GT(stats->wire_bytes, random.size());
  EXPECT_LT(stats->wire_bytes, random.size() + text.size() / 4);
  std::map<uint64_t, std::vector<std::string>> expected{{1, images}};
  ExpectPoints(expected);
}

// The sender gives each data record's buffer back to its source once the
// chunk is serialised (DeltaSource::Recycle), with the record's bytes intact
// on the replica.
TEST_F(TransferTest, SentRecordsBuffersGoBackToTheSource) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(5);
  auto images = EmptyImages();
  class CountingSource final : public DeltaSource {
   public:
    explicit CountingSource(std::vector<DeltaRecord> r) : inner_(std::move(r)) {}
    Result<std::optional<DeltaRecord>> Next() override {
      auto r = inner_.Next();
      if (r.ok() && r->has_value() && !(*r)->zero) ++given;
      return r;
    }
    void Recycle(std::string buffer) override {
      ++recycled;
      recycled_bytes += buffer.size();
    }
    int given = 0, recycled = 0;
    uint64_t recycled_bytes = 0;

   private:
    VectorDeltaSource inner_;
  } src(RandomDelta(rng, images, 40));
  SendOptions o;
  o.chunk_bytes = 64 << 10;
  auto stats = client->SendDelta(Info(1), src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_GT(src.given, 0);
  // Every data record's buffer came back, unless split across chunks (its
  // parts are copies, each given back).
  EXPECT_GE(src.recycled, src.given);
  EXPECT_EQ(src.recycled_bytes, stats->data_bytes);
  ExpectPoints({{1, images}});
}

TEST_F(TransferTest, BrokenStreamResumesFromLastAckedChunk) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(7);
  auto images = EmptyImages();
  VectorDeltaSource src(RandomDelta(rng, images, 120));
  std::map<int, std::vector<uint64_t>> sent;  // attempt -> chunk indexes written
  uint64_t acked_at_break = 0;
  TestOnlySendHooks hooks;
  hooks.break_after_chunk = [&](uint64_t index, int attempt, uint64_t acked) {
    sent[attempt].push_back(index);
    if (attempt == 1 && acked >= 3) {
      acked_at_break = acked;
      return true;
    }
    return false;
  };
  client->SetTestOnlySendHooks(hooks);
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 8 << 10;
  auto stats = client->SendDelta(Info(1), src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_GT(stats->resumed, 0u);
  ASSERT_GE(acked_at_break, 3u);
  ASSERT_FALSE(sent[2].empty());
  // The second attempt started where the replica said, never before the
  // chunks acknowledged in the first one, and went on without gaps.
  EXPECT_GE(sent[2].front(), acked_at_break);
  for (size_t i = 1; i < sent[2].size(); ++i) EXPECT_EQ(sent[2][i], sent[2][i - 1] + 1);
  EXPECT_EQ(sent[2].back() + 1, stats->chunks);
  ExpectPoints({{1, images}});
}

// A send that gives up while its chunk-making thread is inside a source that
// waits (here: until told to stop) calls SendOptions::abandon, and returns
// once that thread has stopped. Without it the send would wait for the
// source for ever.
TEST_F(TransferTest, AbandonedSendStopsASourceThatWaits) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  class WaitingSource final : public DeltaSource {
   public:
    Result<std::optional<DeltaRecord>> Next() override {
      if (given_ < 8) {  // 8 blocks (chunks 0 and 1), then waits
        std::string data(4096, static_cast<char>('a' + given_ % 26));
        return std::optional<DeltaRecord>(DataRecord(0, 4096 * given_++, std::move(data)));
      }
      std::unique_lock<std::mutex> l(mu);
      waiting = true;
      cv.notify_all();
      cv.wait(l, [&] { return stop; });
      return Status::Cancelled("stopped");
    }
    std::mutex mu;
    std::condition_variable cv;
    bool waiting = false, stop = false;

   private:
    uint64_t given_ = 0;
  } src;
  TestOnlySendHooks hooks;
  // Breaks the stream after chunk 1 (the last one), once the source waits.
  hooks.break_after_chunk = [&](uint64_t index, int, uint64_t) {
    if (index < 1) return false;
    std::unique_lock<std::mutex> l(src.mu);
    src.cv.wait(l, [&] { return src.waiting; });
    return true;
  };
  client->SetTestOnlySendHooks(hooks);
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 16 << 10;  // 4 blocks per chunk
  o.max_attempts = 1;
  int abandoned = 0;
  o.abandon = [&] {
    ++abandoned;
    std::lock_guard<std::mutex> l(src.mu);
    src.stop = true;
    src.cv.notify_all();
  };
  auto stats = client->SendDelta(Info(1), src, o);
  EXPECT_FALSE(stats.ok());
  EXPECT_EQ(abandoned, 1);
}

// The initial copy is loaded straight into the disks. A copy given up half
// way (its stream broken for good) leaves a load in progress: point 0 is no
// longer readable, and the next log 1 (another cut) restarts the load over
// the disks as they are; a complete log 1 (every block, as the primary's
// full copy sends holes as zero records) leaves exactly its image.
TEST_F(TransferTest, InitialCopyGivenUpHalfWayIsRestartedByTheNextCopy) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(11);
  auto first = EmptyImages();
  {
    VectorDeltaSource src(RandomDelta(rng, first, 120));
    TestOnlySendHooks hooks;
    hooks.break_after_chunk = [](uint64_t index, int, uint64_t) { return index >= 3; };
    client->SetTestOnlySendHooks(hooks);
    SendOptions o;
    o.compress = false;
    o.chunk_bytes = 8 << 10;
    auto stats = client->SendDelta(Info(1), src, o);
    ASSERT_FALSE(stats.ok());
  }
  auto status = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_EQ(status->latest_applied, 0u);
  EXPECT_EQ(status->expected_sequence, 1u);
  // The second copy: every block of both disks, other content, another generation.
  auto second = EmptyImages();
  std::vector<DeltaRecord> full;
  for (uint32_t d = 0; d < kDisks.size(); ++d) {
    for (auto& c : second[d]) c = static_cast<char>(rng());
    for (uint64_t off = 0; off < kDisks[d].size; off += 64 << 10) {
      if ((off >> 16) % 3 == 0) {
        full.push_back(ZeroRecord(d, off, 64 << 10));
        std::fill_n(second[d].begin() + static_cast<std::ptrdiff_t>(off), 64 << 10, '\0');
      } else {
        full.push_back(DataRecord(d, off, second[d].substr(off, 64 << 10)));
      }
    }
  }
  client = Client("primary-a.lab");  // no test hooks
  VectorDeltaSource src(std::move(full));
  auto info = Info(1);
  info.new_generation[0] ^= 0xff;
  SendOptions o;
  o.chunk_bytes = 16 << 10;
  auto stats = client->SendDelta(info, src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  status = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->latest_applied, 1u);
  EXPECT_EQ(status->state, ReplicationState::kReplicating);
  EXPECT_FALSE(std::filesystem::exists(storage_ + "/" + kVm + "/LOAD"));
  ExpectPoints({{1, second}});
}

// A log that builds on another history than the replica's latest point (an
// earlier copy, another export) is refused as "resynchronization required"
// and nothing of it is staged; one on the right base goes on.
TEST_F(TransferTest, LogBuildingOnAnotherGenerationIsRefusedAsResyncRequired) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(13);
  auto images = EmptyImages();
  SendOptions o;
  {
    VectorDeltaSource src(RandomDelta(rng, images, 5));
    ASSERT_TRUE(client->SendDelta(Info(1), src, o).ok());
  }
  {
    auto copy = images;
    VectorDeltaSource src(RandomDelta(rng, copy, 3));
    auto info = Info(2);
    info.base_generation.fill(0x77);
    auto sent = client->SendDelta(info, src, o);
    ASSERT_FALSE(sent.ok());
    EXPECT_EQ(sent.status().code(), Code::kFailedPrecondition);
    EXPECT_NE(sent.status().message().find("resynchronization required"), std::string::npos)
        << sent.status().ToString();
  }
  auto status = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->expected_sequence, 2u);
  {
    VectorDeltaSource src(RandomDelta(rng, images, 3));
    ASSERT_TRUE(client->SendDelta(Info(2), src, o).ok());
  }
  ExpectPoints({{2, images}});
}

TEST_F(TransferTest, OutOfSequenceAndDuplicateLogsAreRefused) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(9);
  auto images = EmptyImages();
  SendOptions o;
  {
    VectorDeltaSource src(RandomDelta(rng, images, 3));
    auto info = Info(2);
    info.initial = false;
    EXPECT_EQ(client->SendDelta(info, src, o).status().code(), Code::kFailedPrecondition);
  }
  {
    VectorDeltaSource src(RandomDelta(rng, images, 3));
    auto info = Info(1);
    info.initial = false;  // sequence 1 is the initial log
    EXPECT_EQ(client->SendDelta(info, src, o).status().code(), Code::kInvalidArgument);
  }
  images = EmptyImages();
  auto recs = RandomDelta(rng, images, 5);
  {
    VectorDeltaSource src(recs);
    ASSERT_TRUE(client->SendDelta(Info(1), src, o).ok());
  }
  {
    // The same log again (a sender that lost the commit answer): answered
    // as committed without sending anything.
    VectorDeltaSource src(recs);
    auto again = client->SendDelta(Info(1), src, o);
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(again->wire_bytes, 0u);
  }
  {
    VectorDeltaSource src(recs);  // the same sequence again, another generation
    EXPECT_EQ(client->SendDelta(Info(1, 9), src, o).status().code(), Code::kFailedPrecondition);
  }
  {
    auto copy = images;
    VectorDeltaSource src(RandomDelta(rng, copy, 3));
    EXPECT_EQ(client->SendDelta(Info(3), src, o).status().code(), Code::kFailedPrecondition);
  }
  // Chunks out of order and duplicated on the wire.
  for (uint64_t bad_index : {uint64_t{1}, uint64_t{0}}) {
    auto stub = RawStub("primary-a.lab");
    grpc::ClientContext ctx;
    auto stream = stub->PushDelta(&ctx);
    v1::DeltaMessage m;
    auto* s = m.mutable_start();
    s->set_vm_id(kVm);
    s->set_sequence(2);
    s->set_base_generation(std::string(16, '\1'));
    s->set_new_generation(std::string(16, '\2'));
    s->set_kind(1);
    ASSERT_TRUE(stream->Write(m));
    v1::DeltaReply r;
    ASSERT_TRUE(stream->Read(&r));
    EXPECT_TRUE(r.started());
    v1::ChunkBody body;
    auto* rec = body.add_records();
    rec->set_disk(0);
    rec->set_offset(0);
    rec->set_length(4);
    rec->set_data("abcd");
    std::string raw = body.SerializeAsString();
    v1::DeltaMessage c;
    c.mutable_chunk()->set_raw_size(raw.size());
    c.mutable_chunk()->set_checksum(XXH3_64bits(raw.data(), raw.size()));
    c.mutable_chunk()->set_payload(raw);
    if (bad_index == 0) {  // chunk 0 accepted, then chunk 0 again
      c.mutable_chunk()->set_index(0);
      ASSERT_TRUE(stream->Write(c));
      ASSERT_TRUE(stream->Read(&r));
      EXPECT_EQ(r.acked_chunks(), 1u);
    }
    c.mutable_chunk()->set_index(bad_index);
    stream->Write(c);
    stream->WritesDone();
    while (stream->Read(&r)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  ExpectPoints({{1, images}});
}

TEST_F(TransferTest, CorruptChunkIsRefusedAndNothingApplied) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(11);
  auto images = EmptyImages();
  auto recs = RandomDelta(rng, images, 30);
  for (bool compress : {false, true}) {
    TestOnlySendHooks hooks;
    hooks.mutate_payload = [](uint64_t index, std::string* payload) {
      if (index == 2) (*payload)[payload->size() / 2] ^= 0x01;
    };
    client->SetTestOnlySendHooks(hooks);
    VectorDeltaSource src(recs);
    SendOptions o;
    o.compress = compress;
    o.chunk_bytes = 8 << 10;
    EXPECT_EQ(client->SendDelta(Info(1), src, o).status().code(), Code::kCorruption) << "compress " << compress;
    auto st = client->GetReplicaStatus(kVm, 0);
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(st->expected_sequence, 1u);
    EXPECT_EQ(st->latest_applied, 0u);
    for (const auto& e : fs::directory_iterator(storage_ + "/" + kVm + "/staging")) {
      EXPECT_NE(e.path().extension(), ".vrl") << e.path();
    }
  }
  EXPECT_EQ(catalog_->ListRecoveryPoints(kVm)->size(), 1u);  // point 0 only
  // The same log sent intact is accepted afterwards.
  client->SetTestOnlySendHooks({});
  VectorDeltaSource src(recs);
  ASSERT_TRUE(client->SendDelta(Info(1), src, SendOptions{}).ok());
  ExpectPoints({{1, images}});
}

TEST_F(TransferTest, UnauthorisedCertificateIsRefused) {
  const auto before = Tree(root_);
  auto client = Client("intruder.lab");
  EXPECT_EQ(client->CreateReplica(Params()).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(client->GetReplicaStatus(kVm, 0).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(Tree(root_), before);
  EXPECT_FALSE(catalog_->GetVm(kVm)->has_value());
}

TEST_F(TransferTest, WrongTrustGroupIsRefused) {
  ASSERT_TRUE(Client("primary-a.lab")->CreateReplica(Params()).ok());
  // Another primary of the same trust group may continue the VM...
  auto same = Client("primary-a2.lab")->GetReplicaStatus(kVm, 0);
  EXPECT_TRUE(same.ok()) << same.status().ToString();
  // ... one of another trust group may not, whatever the call.
  auto b = Client("primary-b.lab");
  EXPECT_EQ(b->CreateReplica(Params()).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(b->GetReplicaStatus(kVm, 0).status().code(), Code::kPermissionDenied);
  std::mt19937_64 rng(3);
  auto images = EmptyImages();
  VectorDeltaSource src(RandomDelta(rng, images, 3));
  EXPECT_EQ(b->SendDelta(Info(1), src, SendOptions{}).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(b->RemoveReplica(kVm, 0).code(), Code::kPermissionDenied);
  EXPECT_TRUE(catalog_->GetRelationship(kVm, 0)->has_value());
}

TEST_F(TransferTest, VmIdWithDotDotCannotLeaveTheStorageLocation) {
  const auto before = Tree(root_);
  auto client = Client("primary-a.lab");
  for (const std::string id : {"..", "../outside", "../outside/6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b",
                               "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b/../../outside"}) {
    EXPECT_EQ(client->CreateReplica(Params(id)).status().code(), Code::kPermissionDenied) << id;
  }
  EXPECT_EQ(client->CreateReplica(Params("not-a-uuid")).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(Tree(root_), before);
}

TEST_F(TransferTest, SymlinkPlantedInTheStorageLocationIsRefused) {
  // The store path itself is a symlink to a directory outside.
  fs::create_symlink(outside_, storage_ + "/" + kVm);
  // The ownership record of another VM id points outside.
  const std::string vm2 = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
  fs::create_symlink(outside_ + "/owner-target", storage_ + "/" + vm2 + ".primary");
  const auto before = Tree(root_);
  auto client = Client("primary-a.lab");
  EXPECT_EQ(client->CreateReplica(Params()).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(client->CreateReplica(Params(vm2)).status().code(), Code::kPermissionDenied);
  EXPECT_EQ(Tree(root_), before);
  EXPECT_TRUE(fs::is_empty(outside_));
  EXPECT_FALSE(catalog_->GetVm(kVm)->has_value());
  EXPECT_FALSE(catalog_->GetVm(vm2)->has_value());
}

// docs/protocol.md "Replica side: applying": an ordinary delta goes
// straight into the store as it arrives. The commit answer comes after the
// store's commit (the point is there when SendDelta returns), and the
// replica writes each changed byte twice (before-image, data) instead of
// three times (the staged copy first).
TEST_F(TransferTest, DeltaIsAppliedWhileReceivedWritingEachChangedByteTwice) {
  auto client = Client("primary-a.lab");
  std::map<uint64_t, std::vector<std::string>> expected;
  std::vector<DeltaRecord> recs;
  PointOneAndADelta(*client, 21, expected, recs);
  ASSERT_FALSE(HasFatalFailure());
  const double changed = 200.0 * 4096;
  VectorDeltaSource src(std::move(recs));
  SendOptions o;
  o.chunk_bytes = 64 << 10;
  const uint64_t w0 = WrittenBytes();
  auto stats = client->SendDelta(Info(2), src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  const uint64_t w1 = WrittenBytes();
  // Applied before the commit answer: no wait needed.
  auto st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 2u);
  EXPECT_EQ(st->expected_sequence, 3u);
  EXPECT_EQ((*catalog_->GetRelationship(kVm, 0))->sequence, 2u);
  EXPECT_GT((*catalog_->GetRelationship(kVm, 0))->last_apply_ms, 0);
  EXPECT_TRUE(catalog_->ListStagedLogs(kVm)->empty());
  EXPECT_TRUE(fs::is_empty(storage_ + "/" + kVm + "/staging") ||
              Tree(storage_ + "/" + kVm + "/staging") == std::set<std::string>{"rejected"});
  const double ratio = static_cast<double>(w1 - w0) / changed;
  std::cerr << "applied while received: written per changed byte " << ratio << "\n";
  EXPECT_GE(ratio, 2.0) << "before-images and data";
  EXPECT_LT(ratio, 2.5) << "written per changed byte: no staged copy expected";
  ExpectPoints(expected);
}

TEST_F(TransferTest, WithApplyWhileReceivingOffDeltasAreStagedFirst) {
  StopServer();
  apply_while_receiving_ = false;
  StartServer();
  auto client = Client("primary-a.lab");
  std::map<uint64_t, std::vector<std::string>> expected;
  std::vector<DeltaRecord> recs;
  PointOneAndADelta(*client, 21, expected, recs);
  ASSERT_FALSE(HasFatalFailure());
  VectorDeltaSource src(std::move(recs));
  SendOptions o;
  o.chunk_bytes = 64 << 10;
  const uint64_t w0 = WrittenBytes();
  ASSERT_TRUE(client->SendDelta(Info(2), src, o).ok());
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  const double ratio = static_cast<double>(WrittenBytes() - w0) / (200.0 * 4096);
  std::cerr << "staged first: written per changed byte " << ratio << "\n";
  EXPECT_GT(ratio, 2.5) << "written per changed byte: the staged copy, before-images, data";
  ExpectPoints(expected);
}

// A broken stream resumes into the apply in progress (same start, next
// chunk), and the result is exact.
TEST_F(TransferTest, BrokenDeltaStreamResumesIntoTheApplyInProgress) {
  auto client = Client("primary-a.lab");
  std::map<uint64_t, std::vector<std::string>> expected;
  std::vector<DeltaRecord> recs;
  PointOneAndADelta(*client, 22, expected, recs);
  ASSERT_FALSE(HasFatalFailure());
  std::map<int, std::vector<uint64_t>> sent;
  uint64_t acked_at_break = 0;
  TestOnlySendHooks hooks;
  hooks.break_after_chunk = [&](uint64_t index, int attempt, uint64_t acked) {
    sent[attempt].push_back(index);
    if (attempt == 1 && acked >= 3) {
      acked_at_break = acked;
      return true;
    }
    return false;
  };
  client->SetTestOnlySendHooks(hooks);
  VectorDeltaSource src(std::move(recs));
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 16 << 10;
  const uint64_t w0 = WrittenBytes();
  auto stats = client->SendDelta(Info(2), src, o);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  const uint64_t w1 = WrittenBytes();
  EXPECT_GT(stats->resumed, 0u);
  ASSERT_FALSE(sent[2].empty());
  EXPECT_GE(sent[2].front(), acked_at_break);
  EXPECT_EQ(client->GetReplicaStatus(kVm, 0)->latest_applied, 2u);
  EXPECT_LT(static_cast<double>(w1 - w0) / (200.0 * 4096), 2.5) << "the resumed log was applied, not staged";
  ExpectPoints(expected);
}

// A chunk that fails its checksum ends the apply: the store rolls back to
// point 1, exactly as it was; the same log sent again is staged (so that a
// further break would resume) and lands.
TEST_F(TransferTest, FailedApplyWhileReceivingRollsBackAndTheRetryIsStaged) {
  UseOneBlockBatches();
  auto client = Client("primary-a.lab");
  std::map<uint64_t, std::vector<std::string>> expected;
  std::vector<DeltaRecord> recs;
  PointOneAndADelta(*client, 23, expected, recs);
  ASSERT_FALSE(HasFatalFailure());
  TestOnlySendHooks hooks;
  hooks.mutate_payload = [](uint64_t index, std::string* payload) {
    if (index == 6) (*payload)[payload->size() / 2] ^= 0x01;
  };
  client->SetTestOnlySendHooks(hooks);
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 16 << 10;
  {
    VectorDeltaSource src(recs);
    EXPECT_EQ(client->SendDelta(Info(2), src, o).status().code(), Code::kCorruption);
  }
  auto st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 1u);
  EXPECT_EQ(st->expected_sequence, 2u);
  EXPECT_EQ(st->partial_sequence, 0u);
  // Whatever of chunks 0..5 had reached the disk (one block a batch), the
  // rollback put every byte back.
  EXPECT_TRUE(DiskFile(0) == expected[1][0]) << "vda is not back at point 1";
  EXPECT_TRUE(DiskFile(1) == expected[1][1]) << "vdb is not back at point 1";
  client->SetTestOnlySendHooks({});
  const uint64_t w0 = WrittenBytes();
  {
    VectorDeltaSource src(recs);
    ASSERT_TRUE(client->SendDelta(Info(2), src, o).ok());
  }
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  EXPECT_GT(static_cast<double>(WrittenBytes() - w0) / (200.0 * 4096), 2.5) << "the retry was staged";
  ExpectPoints(expected);
}

// A stream broken for good leaves the apply waiting for a resume. A
// failover's HoldApply cancels it (the store stays at point 1); after the
// hold the log comes again and lands.
TEST_F(TransferTest, HoldApplyCancelsAnApplyWaitingForItsStream) {
  UseOneBlockBatches();
  auto client = Client("primary-a.lab");
  std::map<uint64_t, std::vector<std::string>> expected;
  std::vector<DeltaRecord> recs;
  PointOneAndADelta(*client, 24, expected, recs);
  ASSERT_FALSE(HasFatalFailure());
  TestOnlySendHooks hooks;
  hooks.break_after_chunk = [](uint64_t, int, uint64_t acked) { return acked >= 3; };
  client->SetTestOnlySendHooks(hooks);
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 16 << 10;
  o.max_attempts = 1;
  {
    VectorDeltaSource src(recs);
    EXPECT_FALSE(client->SendDelta(Info(2), src, o).ok());
  }
  auto st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->partial_sequence, 2u) << "the apply waits for its stream";
  EXPECT_GE(st->partial_chunks, 3u);
  EXPECT_EQ(st->latest_applied, 1u);
  EXPECT_TRUE(Eventually([&] { return DiskFile(0) != expected[1][0]; }))
      << "the apply wrote nothing: the rollback is not tested";
  ASSERT_TRUE(manager_->HoldApply(kVm, std::chrono::seconds(30)).ok());
  st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 1u);
  EXPECT_EQ(st->partial_sequence, 0u) << "the cancelled apply holds nothing";
  EXPECT_TRUE(DiskFile(0) == expected[1][0]) << "vda is not back at point 1";
  manager_->ReleaseApply(kVm);
  client->SetTestOnlySendHooks({});
  o.max_attempts = 5;
  {
    VectorDeltaSource src(recs);
    auto stats = client->SendDelta(Info(2), src, o);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  }
  ExpectPoints(expected);
}

// Nobody resumes: the apply gives up after apply_idle_timeout and rolls
// back; a daemon stop with an apply waiting rolls it back too. Both times
// the store is at point 1 and the log sent again lands.
TEST_F(TransferTest, AnApplyWhoseStreamNeverResumesRollsBack) {
  StopServer();
  apply_idle_timeout_ = std::chrono::milliseconds(300);
  apply_batch_bytes_ = 4096;  // the broken apply has blocks on the disk to undo
  StartServer();
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(25);
  auto images = EmptyImages();
  SendFullCopy(*client, rng, images);
  const auto point1 = images;
  auto recs2 = BlockDelta(rng, images, 200);
  const auto point2 = images;
  TestOnlySendHooks hooks;
  hooks.break_after_chunk = [](uint64_t, int, uint64_t acked) { return acked >= 3; };
  SendOptions o;
  o.compress = false;
  o.chunk_bytes = 16 << 10;
  o.max_attempts = 1;
  client->SetTestOnlySendHooks(hooks);
  {
    VectorDeltaSource src(recs2);
    EXPECT_FALSE(client->SendDelta(Info(2), src, o).ok());
  }
  // Past the idle timeout (counted from the break): rolled back, nothing
  // held in part, the disk back at point 1 byte for byte.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  auto st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 1u);
  EXPECT_EQ(st->partial_sequence, 0u) << "the timed-out apply holds nothing";
  EXPECT_TRUE(DiskFile(0) == point1[0]) << "vda is not back at point 1";
  o.max_attempts = 5;
  client->SetTestOnlySendHooks({});
  const uint64_t w0 = WrittenBytes();
  {
    VectorDeltaSource src(recs2);
    ASSERT_TRUE(client->SendDelta(Info(2), src, o).ok());
  }
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  EXPECT_GT(static_cast<double>(WrittenBytes() - w0) / (200.0 * 4096), 2.5) << "the retry was staged";

  // Log 3 broken for good with the default idle timeout: the apply waits
  // for its stream; then the daemon stops, which rolls it back.
  StopServer();
  apply_idle_timeout_ = std::chrono::milliseconds(120000);
  StartServer();
  client = Client("primary-a.lab");
  auto recs3 = BlockDelta(rng, images, 200);
  client->SetTestOnlySendHooks(hooks);
  o.max_attempts = 1;
  {
    VectorDeltaSource src(recs3);
    EXPECT_FALSE(client->SendDelta(Info(3), src, o).ok());
  }
  st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->partial_sequence, 3u) << "the apply waits for its stream";
  EXPECT_TRUE(Eventually([&] { return DiskFile(0) != point2[0]; }))
      << "the apply wrote nothing: the rollback is not tested";
  StopServer();
  EXPECT_TRUE(DiskFile(0) == point2[0]) << "vda is not back at point 2 after the stop";
  StartServer();
  client = Client("primary-a.lab");
  st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 2u);
  EXPECT_EQ(st->expected_sequence, 3u);
  o.max_attempts = 5;
  {
    VectorDeltaSource src(recs3);
    ASSERT_TRUE(client->SendDelta(Info(3), src, o).ok());
  }
  ExpectPoints({{1, point1}, {2, point2}, {3, images}});
}

TEST_F(TransferTest, HelloOffersTheDeltaFeature) {
  auto stub = RawStub("primary-a.lab");
  grpc::ClientContext ctx;
  v1::HelloRequest req;
  req.set_protocol_version(1);
  req.add_features(kDeltaFeature);
  v1::HelloResponse resp;
  ASSERT_TRUE(stub->Hello(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.features_size(), 1);
  EXPECT_EQ(resp.features(0), kDeltaFeature);
  EXPECT_TRUE(resp.authorized());
}

TEST_F(TransferTest, StagedLogsAreAppliedAfterARestart) {
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(client->CreateReplica(Params()).ok());
  std::mt19937_64 rng(5);
  auto images = EmptyImages();
  std::map<uint64_t, std::vector<std::string>> expected;
  for (uint64_t seq = 1; seq <= 2; ++seq) {
    VectorDeltaSource src(RandomDelta(rng, images, 10));
    expected[seq] = images;
    ASSERT_TRUE(client->SendDelta(Info(seq), src, SendOptions{}).ok());
  }
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  StopServer();
  {
    // While the daemon is down, log 3 is staged but not applied (as after a
    // crash between the acknowledgement and the apply).
    auto store = ReplicaStore::Open(storage_ + "/" + kVm, nullptr, ReplicaStoreOptions{});
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    auto staging = Staging::Open(storage_ + "/" + kVm + "/staging", **store);
    ASSERT_TRUE(staging.ok()) << staging.status().ToString();
    LogHeader h;
    h.relationship_id = kVm;
    h.sequence = 3;
    const DeltaInfo info = Info(3);
    h.base_generation = info.base_generation;
    h.new_generation = info.new_generation;
    h.cut_time_unix_ms = info.cut_time_unix_ms;
    h.kind = info.kind;
    for (const auto& d : kDisks) h.disks.push_back(LogDisk{d.name, d.size});
    auto writer = (*staging)->BeginReceive(h);
    ASSERT_TRUE(writer.ok()) << writer.status().ToString();
    for (const auto& r : RandomDelta(rng, images, 10)) ASSERT_TRUE((*writer)->Add(r).ok());
    expected[3] = images;
    ASSERT_TRUE((*writer)->Finish().ok());
    ASSERT_TRUE((*staging)->CommitReceived(3).ok());
  }
  StartServer();
  manager_->OpenAll();  // as the daemon does at start: applies log 3
  ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
  client = Client("primary-a.lab");
  auto st = client->GetReplicaStatus(kVm, 0);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->latest_applied, 3u);
  EXPECT_EQ(st->expected_sequence, 4u);
  EXPECT_EQ(st->state, ReplicationState::kReplicating);
  EXPECT_EQ((*catalog_->GetRelationship(kVm, 0))->sequence, 3u);
  VectorDeltaSource src(RandomDelta(rng, images, 10));
  expected[4] = images;
  ASSERT_TRUE(client->SendDelta(Info(4), src, SendOptions{}).ok());
  ExpectPoints(expected);
}

// ---------------------------------------------------------------------------
// GetRangeHashes (docs/protocol.md "GetRangeHashes"). Disks large enough for
// runs more than 1 MiB apart (the merge gap): 128 and 64 blocks of 64 KiB.

const std::vector<ReplicaDisk> kRangeDisks = {{"vda", 8 << 20}, {"vdb", 4 << 20}};
constexpr uint32_t kHashBlock = 64 << 10;

class RangeHashTest : public TransferTest {
 protected:
  // A replica as the adoption leaves it (docs/failover.md 11): state 2
  // (WaitingToCompleteInitialReplication) at point 1, nothing staged. No
  // public path of this module adopts a store, so log 1 is sent and applied
  // (the applier then moves the relationship to 3) and the test puts the
  // relationship back to state 2 in the catalog, as the adoption writes it.
  void MakeReplicaAtPointOne() {
    auto client = Client("primary-a.lab");
    auto p = Params();
    p.disks = kRangeDisks;
    ASSERT_TRUE(client->CreateReplica(p).ok());
    images_.clear();
    for (const auto& d : kRangeDisks) images_.emplace_back(d.size, '\0');
    std::mt19937_64 rng(77);
    std::vector<DeltaRecord> recs;
    // Data in and around the candidate runs of the tests, and elsewhere.
    const std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> writes = {
        {0, 0, 96 << 10},     {0, 300 << 10, 8 << 10},     {0, 5 << 20, 128 << 10}, {0, (6 << 20) + 4096, 4096},
        {0, (8 << 20) - 8192, 8192}, {0, 3 << 20, 64 << 10}, {1, 2 << 20, 100 << 10}, {1, 64 << 10, 4096}};
    for (const auto& [disk, off, len] : writes) {
      std::string data(len, '\0');
      for (auto& c : data) c = static_cast<char>(rng());
      std::copy(data.begin(), data.end(), images_[disk].begin() + static_cast<ptrdiff_t>(off));
      recs.push_back(DataRecord(disk, off, std::move(data)));
    }
    VectorDeltaSource src(std::move(recs));
    ASSERT_TRUE(client->SendDelta(Info(1), src, SendOptions{}).ok());
    ASSERT_TRUE(manager_->WaitApplied(kVm, std::chrono::seconds(60)).ok());
    SetState(ReplicationState::kWaitingToCompleteInitialReplication);
    auto st = client->GetReplicaStatus(kVm, 0);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    ASSERT_EQ(st->latest_applied, 1u);
    ASSERT_EQ(st->expected_sequence, 2u);
    ASSERT_EQ(st->state, ReplicationState::kWaitingToCompleteInitialReplication);
  }

  void SetState(ReplicationState state) {
    auto rel = catalog_->GetRelationship(kVm, 0);
    ASSERT_TRUE(rel.ok() && *rel);
    (*rel)->state = state;
    ASSERT_TRUE(catalog_->PutRelationship(**rel).ok());
  }

  std::string AcandPath() const { return root_ + "/state/reverse/" + kVm + ".acand"; }

  // The hash list of blocks [first, first + count) of disk `disk`, computed
  // here from the store's disk file (which must equal the image written).
  BlockHashList Expected(uint32_t disk, uint64_t first, uint64_t count) {
    const std::string path = storage_ + "/" + kVm + "/disks/" + kRangeDisks[disk].name + ".img";
    std::ifstream f(path, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    EXPECT_EQ(content.size(), kRangeDisks[disk].size) << path;
    EXPECT_TRUE(content == images_[disk]) << path << " is not the image of log 1";
    BlockHashList l;
    l.block_size = kHashBlock;
    l.disk_size = kRangeDisks[disk].size;
    l.first_block = first;
    for (uint64_t b = first; b < first + count; ++b) {
      const uint64_t off = b * kHashBlock;
      const uint64_t len = std::min<uint64_t>(kHashBlock, content.size() - std::min<uint64_t>(off, content.size()));
      l.hashes.push_back(HashBytes(content.data() + off, len));
    }
    return l;
  }

  struct Run {
    uint64_t first, count;
  };
  void ExpectRuns(const std::vector<std::vector<BlockHashList>>& got, const std::vector<std::vector<Run>>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (uint32_t d = 0; d < want.size(); ++d) {
      ASSERT_EQ(got[d].size(), want[d].size()) << "disk " << d;
      for (size_t i = 0; i < want[d].size(); ++i) {
        const BlockHashList e = Expected(d, want[d][i].first, want[d][i].count);
        EXPECT_EQ(got[d][i].block_size, kHashBlock);
        EXPECT_EQ(got[d][i].disk_size, e.disk_size) << "disk " << d << " run " << i;
        EXPECT_EQ(got[d][i].first_block, e.first_block) << "disk " << d << " run " << i;
        EXPECT_TRUE(got[d][i].hashes == e.hashes) << "disk " << d << " run " << i << ": hashes differ";
      }
    }
  }

  // B's candidates of the tests: disk 0 blocks 0 and 4 (merged: closer than
  // 1 MiB), block 80, block 127 (the last); nothing on disk 1.
  static std::vector<ReplicaRange> Candidates() {
    return {{0, (5 << 20), 4096}, {0, 4096, 4096}, {0, 300 << 10, 8192}, {0, (8 << 20) - 4096, 4096}};
  }

  std::vector<std::string> images_;
};

TEST_F(RangeHashTest, CandidateRunsOnTwoDisksHashAsTheDiskFiles) {
  MakeReplicaAtPointOne();
  auto client = Client("primary-a.lab");
  const auto cands = Candidates();
  // Without an acand file A cannot tell what it wrote (the adoption writes
  // one): every block.
  auto got = client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{0, 128}}, {{0, 64}}});

  // An empty acand file: B's runs only; disk 1 has none.
  fs::create_directories(root_ + "/state/reverse");
  ASSERT_TRUE(WriteRangeListFile(AcandPath(), kRangeListCandidates, 2, SinceList{}).ok());
  got = client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{0, 5}, {80, 1}, {127, 1}}, {}});

  // A's own candidates united in: disk 0 block 96 (joins run 80: 15 blocks
  // apart), disk 1 blocks 32..33.
  SinceList acand;
  acand.entries = {{0, (6 << 20) + 4096, 4096, 0}, {1, 2 << 20, 128 << 10, 0}};
  ASSERT_TRUE(WriteRangeListFile(AcandPath(), kRangeListCandidates, 2, acand).ok());
  got = client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{0, 5}, {80, 17}, {127, 1}}, {{32, 2}}});

  // B's candidates empty: A's alone.
  const std::vector<ReplicaRange> none;
  got = client->GetRangeHashes(kVm, 0, kHashBlock, &none, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{96, 1}}, {{32, 2}}});

  // The wire form: pieces per run, end_of_run on each, end_of_disk on a
  // disk's last run, disks ascending.
  auto stub = RawStub("primary-a.lab");
  grpc::ClientContext ctx;
  v1::RangeHashRequest req;
  req.set_vm_id(kVm);
  req.set_block_size(kHashBlock);
  SinceList b;
  for (const auto& c : cands) b.entries.push_back({c.disk, c.offset, c.length, 0});
  std::sort(b.entries.begin(), b.entries.end(),
            [](const RangeEntry& x, const RangeEntry& y) { return x.offset < y.offset; });
  req.set_ranges(SerializeRangeList(kRangeListCandidates, 2, b));
  auto reader = stub->GetRangeHashes(&ctx, req);
  std::vector<std::tuple<uint32_t, bool, bool>> pieces;
  v1::BlockHashPiece piece;
  while (reader->Read(&piece)) pieces.emplace_back(piece.disk(), piece.end_of_run(), piece.end_of_disk());
  ASSERT_TRUE(reader->Finish().ok());
  const std::vector<std::tuple<uint32_t, bool, bool>> want = {
      {0, true, false}, {0, true, false}, {0, true, true}, {1, true, true}};
  EXPECT_EQ(pieces, want);
}

TEST_F(RangeHashTest, AllBlocksIsOneRunPerDisk) {
  MakeReplicaAtPointOne();
  // An acand file adds nothing to every block.
  fs::create_directories(root_ + "/state/reverse");
  SinceList acand;
  acand.entries = {{1, 2 << 20, 128 << 10, 0}};
  ASSERT_TRUE(WriteRangeListFile(AcandPath(), kRangeListCandidates, 2, acand).ok());
  auto got = Client("primary-a.lab")->GetRangeHashes(kVm, 0, kHashBlock, nullptr, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{0, 128}}, {{0, 64}}});
}

TEST_F(RangeHashTest, CorruptAcandFileMeansEveryBlock) {
  MakeReplicaAtPointOne();
  fs::create_directories(root_ + "/state/reverse");
  SinceList acand;
  acand.entries = {{1, 2 << 20, 128 << 10, 0}};
  const std::string bytes = SerializeRangeList(kRangeListCandidates, 2, acand);
  std::string bad = bytes;
  bad[kRangeListHeaderBytes + 10] ^= 0x01;  // inside the entry: the body checksum fails
  {
    std::ofstream f(AcandPath(), std::ios::binary);
    f << bad;
  }
  const auto cands = Candidates();
  auto got = Client("primary-a.lab")->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectRuns(*got, {{{0, 128}}, {{0, 64}}});
}

TEST_F(RangeHashTest, RefusedOutsideStateTwoAtPointOne) {
  MakeReplicaAtPointOne();
  auto client = Client("primary-a.lab");
  const auto cands = Candidates();
  SetState(ReplicationState::kReplicating);
  auto got = client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  EXPECT_EQ(got.status().code(), Code::kFailedPrecondition) << got.status().ToString();
  SetState(ReplicationState::kWaitingToCompleteInitialReplication);
  EXPECT_TRUE(client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2).ok());
}

TEST_F(RangeHashTest, RefusedWhileALogIsStaged) {
  MakeReplicaAtPointOne();
  auto client = Client("primary-a.lab");
  ASSERT_TRUE(manager_->HoldApply(kVm, std::chrono::seconds(30)).ok());
  VectorDeltaSource src({DataRecord(0, 0, std::string(4096, 'x'))});
  ASSERT_TRUE(client->SendDelta(Info(2), src, SendOptions{}).ok());
  const auto cands = Candidates();
  auto got = client->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  EXPECT_EQ(got.status().code(), Code::kFailedPrecondition) << got.status().ToString();
  EXPECT_NE(got.status().message().find("staged"), std::string::npos) << got.status().ToString();
  manager_->ReleaseApply(kVm);
}

TEST_F(RangeHashTest, FlippedByteInTheRangesIsInvalidArgument) {
  MakeReplicaAtPointOne();
  auto stub = RawStub("primary-a.lab");
  SinceList b;
  b.entries = {{0, 4096, 4096, 0}};
  const std::string good = SerializeRangeList(kRangeListCandidates, 2, b);
  for (size_t at : {size_t{3}, size_t{20}, kRangeListHeaderBytes + 9, good.size() - 1}) {
    std::string bad = good;
    bad[at] ^= 0x40;
    grpc::ClientContext ctx;
    v1::RangeHashRequest req;
    req.set_vm_id(kVm);
    req.set_block_size(kHashBlock);
    req.set_ranges(bad);
    auto reader = stub->GetRangeHashes(&ctx, req);
    v1::BlockHashPiece piece;
    EXPECT_FALSE(reader->Read(&piece)) << "byte " << at;
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT) << "byte " << at;
  }
  // A range past the disk's end and a wrong disk count are refused too.
  SinceList past_end;
  past_end.entries = {{1, 4 << 20, 4096, 0}};
  for (const std::string& blob :
       {SerializeRangeList(kRangeListCandidates, 2, past_end), SerializeRangeList(kRangeListCandidates, 3, b)}) {
    grpc::ClientContext ctx;
    v1::RangeHashRequest req;
    req.set_vm_id(kVm);
    req.set_block_size(kHashBlock);
    req.set_ranges(blob);
    auto reader = stub->GetRangeHashes(&ctx, req);
    v1::BlockHashPiece piece;
    EXPECT_FALSE(reader->Read(&piece));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

TEST_F(RangeHashTest, AnotherTrustGroupsCallerIsRefused) {
  MakeReplicaAtPointOne();
  const auto cands = Candidates();
  auto got = Client("primary-b.lab")->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  EXPECT_EQ(got.status().code(), Code::kPermissionDenied) << got.status().ToString();
  got = Client("intruder.lab")->GetRangeHashes(kVm, 0, kHashBlock, &cands, 2);
  EXPECT_EQ(got.status().code(), Code::kPermissionDenied) << got.status().ToString();
}

// A peer that answers GetRangeHashes with scripted pieces: the client's
// checks of every piece (docs/protocol.md "GetRangeHashes").
// A refused stream's handler may still run when the next call starts: each
// call takes its own copy of the script.
class ScriptedRangePeer final : public v1::ReplicaPeer::Service {
 public:
  void SetPieces(std::vector<v1::BlockHashPiece> pieces) {
    std::lock_guard<std::mutex> l(mu_);
    pieces_ = std::move(pieces);
  }
  grpc::Status GetRangeHashes(grpc::ServerContext*, const v1::RangeHashRequest*,
                              grpc::ServerWriter<v1::BlockHashPiece>* writer) override {
    std::vector<v1::BlockHashPiece> script;
    {
      std::lock_guard<std::mutex> l(mu_);
      script = pieces_;
    }
    for (const auto& p : script) {
      if (!writer->Write(p)) break;
    }
    return grpc::Status::OK;
  }

 private:
  std::mutex mu_;
  std::vector<v1::BlockHashPiece> pieces_;  // guarded by mu_
};

v1::BlockHashPiece Piece(uint32_t disk, uint64_t first, uint64_t count, bool end_of_disk,
                         uint32_t block_size = kHashBlock, uint64_t disk_size = 8 << 20) {
  BlockHashList l;
  l.block_size = block_size;
  l.disk_size = disk_size;
  l.first_block = first;
  for (uint64_t i = 0; i < count; ++i) l.hashes.push_back(Hash128{i, first});
  v1::BlockHashPiece p;
  p.set_disk(disk);
  p.set_data(SerializeBlockHashes(l));
  p.set_end_of_run(true);
  p.set_end_of_disk(end_of_disk);
  return p;
}

TEST_F(TransferTest, RangeHashAnswersThatBreakARuleAreCorruption) {
  ScriptedRangePeer peer;
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", service::MakeServerCredentials(env_.identity), &port);
  b.RegisterService(&peer);
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ReplicaClient client(service::MakeSecureChannel("127.0.0.1", static_cast<uint16_t>(port), Identity("primary-a.lab")));
  auto run = [&](std::vector<v1::BlockHashPiece> pieces) {
    peer.SetPieces(std::move(pieces));
    return client.GetRangeHashes(kVm, 0, kHashBlock, nullptr, 2);
  };

  // A well-formed answer passes (the scripted peer itself is right) ...
  auto ok = run({Piece(0, 0, 2, false), Piece(0, 5, 1, true), Piece(1, 3, 1, true)});
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  ASSERT_EQ(ok->size(), 2u);
  EXPECT_EQ((*ok)[0].size(), 2u);
  EXPECT_EQ((*ok)[1].size(), 1u);
  // ... a run split in two pieces too.
  v1::BlockHashPiece whole = Piece(0, 0, 4, true);
  v1::BlockHashPiece head = whole, tail = whole;
  head.set_data(whole.data().substr(0, 10));
  head.set_end_of_run(false);
  head.set_end_of_disk(false);
  tail.set_data(whole.data().substr(10));
  auto split = run({head, tail});
  ASSERT_TRUE(split.ok()) << split.status().ToString();
  EXPECT_EQ((*split)[0].at(0).hashes.size(), 4u);

  v1::BlockHashPiece empty = Piece(0, 0, 1, true);
  empty.set_data("");
  v1::BlockHashPiece eod_inside = head;
  eod_inside.set_end_of_disk(true);
  v1::BlockHashPiece flipped = Piece(0, 0, 2, true);
  flipped.mutable_data()->back() ^= 1;
  const std::vector<std::pair<std::string, std::vector<v1::BlockHashPiece>>> cases = {
      {"disks out of order", {Piece(1, 0, 1, true), Piece(0, 0, 1, true)}},
      {"a disk again after its end", {Piece(0, 0, 1, true), Piece(0, 4, 1, true)}},
      {"another disk before the end of one", {Piece(0, 0, 1, false), Piece(1, 0, 1, true)}},
      {"a disk past disk_count", {Piece(2, 0, 1, true)}},
      {"overlapping runs", {Piece(0, 0, 3, false), Piece(0, 2, 1, true)}},
      {"runs descending", {Piece(0, 5, 1, false), Piece(0, 1, 1, true)}},
      {"another block size", {Piece(0, 0, 1, true, 4096)}},
      {"another disk size within a disk", {Piece(0, 0, 1, false), Piece(0, 4, 1, true, kHashBlock, 4 << 20)}},
      {"a run past the disk", {Piece(0, 127, 2, true)}},
      {"an empty piece", {empty}},
      {"end_of_disk inside a run", {eod_inside, tail}},
      {"the stream ends inside a run", {head}},
      {"the stream ends inside a disk", {Piece(0, 0, 1, false)}},
      {"a list failing its checksum", {flipped}},
  };
  for (const auto& [name, pieces] : cases) {
    auto got = run(pieces);
    EXPECT_EQ(got.status().code(), Code::kCorruption) << name << ": " << got.status().ToString();
  }
  server->Shutdown();
}

}  // namespace
}  // namespace vmreplica
