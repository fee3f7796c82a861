// StreamApply on a real ReplicaStore in a temporary directory: records
// pushed chunk by chunk become one point at Finish; a cancel, an idle
// timeout, a refused record or the destructor roll the store back to its
// previous point, byte for byte. Expected images are computed here.
#include "stream_apply.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

const char* kVm = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
constexpr uint64_t kDiskSize = 1 << 20;

class StreamApplyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-sapply-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // Batches of one block: an apply writes data into the disk early, so
    // that a rollback has something to undo.
    ReplicaStoreOptions so;
    so.apply_batch_bytes = 4096;
    // Fault-injection seam of the store, used here as a slow disk.
    so.crash_hook = [this](std::string_view, uint64_t) {
      if (const int ms = slow_ms_.load()) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    };
    auto store = ReplicaStore::Create(dir_ + "/store", kVm, {{"vda", kDiskSize}}, nullptr, so);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(*store);
    // Point 1: the whole disk random.
    image_.resize(kDiskSize);
    for (auto& c : image_) c = static_cast<char>(rng_());
    VectorDeltaSource src({DataRecord(0, 0, image_)});
    ASSERT_TRUE(store_->Apply(1, Info(1), src).ok());
  }

  void TearDown() override {
    store_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  static PointInfo Info(uint64_t seq) {
    PointInfo p;
    // Recent cut times: every point stays inside the store's fine window.
    static const int64_t base = std::chrono::duration_cast<std::chrono::milliseconds>(
                                    std::chrono::system_clock::now().time_since_epoch())
                                    .count() -
                                60000;
    p.time_ms = base + static_cast<int64_t>(seq) * 1000;
    p.kind = ReplicationType::kRegular;
    p.generation_id = std::string(31, '0') + std::to_string(seq % 10);
    return p;
  }

  // `n` chunks of `per_chunk` random 4 KiB blocks; applied to `image`.
  std::vector<std::vector<DeltaRecord>> Chunks(int n, int per_chunk, std::string& image) {
    std::vector<std::vector<DeltaRecord>> out(n);
    for (auto& chunk : out) {
      for (int i = 0; i < per_chunk; ++i) {
        const uint64_t off = (rng_() % (kDiskSize / 4096)) * 4096;
        std::string data(4096, '\0');
        for (auto& c : data) c = static_cast<char>(rng_());
        std::copy(data.begin(), data.end(), image.begin() + static_cast<std::ptrdiff_t>(off));
        chunk.push_back(DataRecord(0, off, std::move(data)));
      }
    }
    return out;
  }

  std::string Read(uint64_t seq) {
    std::string got(kDiskSize, '\x55');
    Status s = store_->ReadPoint(seq, 0, 0, kDiskSize, got.data());
    EXPECT_TRUE(s.ok()) << s.ToString();
    return got;
  }

  // The disk file as it is now (not a point).
  std::string DiskFile() {
    std::ifstream in(store_->DiskPath(0), std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  // Waits up to 10 s until the apply has written into the disk file.
  void WaitForDataOnDisk() {
    for (int i = 0; i < 1000 && DiskFile() == image_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_NE(DiskFile(), image_) << "the apply wrote nothing: the rollback would not be tested";
  }

  void ExpectBackAtPointOne() {
    EXPECT_EQ(store_->latest_sequence(), 1u);
    EXPECT_TRUE(Read(1) == image_) << "point 1 changed";
    EXPECT_TRUE(DiskFile() == image_) << "the disk file is not back at point 1";
    // The store takes log 2 again afterwards.
    std::string next = image_;
    auto chunks = Chunks(1, 3, next);
    VectorDeltaSource src(chunks[0]);
    ASSERT_TRUE(store_->Apply(2, Info(2), src).ok());
    EXPECT_TRUE(Read(2) == next);
  }

  std::string dir_;
  std::atomic<int> slow_ms_{0};  // the store sleeps this long at each write / fsync step
  std::mt19937_64 rng_{99};
  std::unique_ptr<ReplicaStore> store_;
  std::string image_;  // point 1
};

TEST_F(StreamApplyTest, PushedChunksBecomeOnePointAtFinish) {
  std::string next = image_;
  auto chunks = Chunks(20, 8, next);
  std::atomic<int> done_calls{0};
  StreamApplyOptions o;
  o.max_queued_bytes = 3 * 4096;  // the pusher waits for the store most of the time
  o.on_done = [&] { ++done_calls; };
  {
    StreamApply a(*store_, 2, Info(2), o);
    for (auto& c : chunks) ASSERT_TRUE(a.Push(std::move(c)).ok());
    ASSERT_TRUE(a.Push({}).ok());  // a chunk without records
    EXPECT_EQ(store_->latest_sequence(), 1u) << "nothing is committed before Finish";
    Status s = a.Finish();
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(a.done());
    EXPECT_EQ(store_->latest_sequence(), 2u);
    EXPECT_TRUE(a.Finish().ok()) << "idempotent";
    EXPECT_EQ(a.Push({}).code(), Code::kFailedPrecondition);
  }
  EXPECT_EQ(done_calls.load(), 1) << "on_done ran once, before the destructor returned";
  EXPECT_TRUE(Read(2) == next);
  EXPECT_TRUE(Read(1) == image_) << "point 1 stays readable from its undo";
}

// A store slower than the stream: Push and Finish wait, calling `waiting`
// (the receiver's heartbeat) meanwhile, and the point is exact.
TEST_F(StreamApplyTest, WaitingForASlowStoreCallsTheHeartbeat) {
  std::string next = image_;
  auto chunks = Chunks(6, 2, next);
  slow_ms_ = 20;
  StreamApplyOptions o;
  o.max_queued_bytes = 1;  // one chunk at a time
  o.heartbeat = std::chrono::milliseconds(5);
  int push_waits = 0, finish_waits = 0;
  StreamApply a(*store_, 2, Info(2), o);
  for (auto& c : chunks) ASSERT_TRUE(a.Push(std::move(c), [&] { ++push_waits; }).ok());
  Status s = a.Finish([&] { ++finish_waits; });
  slow_ms_ = 0;
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_GT(push_waits, 0);
  EXPECT_GT(finish_waits, 0);
  EXPECT_TRUE(Read(2) == next);
}

TEST_F(StreamApplyTest, CancelRollsBackAndLaterCallsAnswerTheReason) {
  std::string next = image_;
  auto chunks = Chunks(6, 8, next);
  StreamApply a(*store_, 2, Info(2), StreamApplyOptions{});
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(a.Push(std::move(chunks[i])).ok());
  WaitForDataOnDisk();
  a.Cancel(Status::Cancelled("test: the stream gave up"));
  Status f = a.Finish();
  EXPECT_EQ(f.code(), Code::kCancelled) << f.ToString();
  EXPECT_NE(f.ToString().find("the stream gave up"), std::string::npos) << f.ToString();
  Status p = a.Push(std::move(chunks[3]));
  EXPECT_EQ(p.code(), Code::kFailedPrecondition) << "after Finish: " << p.ToString();
  ExpectBackAtPointOne();
}

TEST_F(StreamApplyTest, PushAfterACancelAnswersTheReason) {
  std::string next = image_;
  auto chunks = Chunks(4, 8, next);
  StreamApply a(*store_, 2, Info(2), StreamApplyOptions{});
  ASSERT_TRUE(a.Push(std::move(chunks[0])).ok());
  a.Cancel(Status::Cancelled("held"));
  EXPECT_EQ(a.Push(std::move(chunks[1])).code(), Code::kCancelled);
  EXPECT_EQ(a.Finish().code(), Code::kCancelled);
  ExpectBackAtPointOne();
}

TEST_F(StreamApplyTest, NoRecordsForTheIdleTimeoutRollsBack) {
  std::string next = image_;
  auto chunks = Chunks(3, 8, next);
  StreamApplyOptions o;
  o.idle_timeout = std::chrono::milliseconds(100);
  StreamApply a(*store_, 2, Info(2), o);
  ASSERT_TRUE(a.Push(std::move(chunks[0])).ok());
  WaitForDataOnDisk();
  // Attached (a stream feeds it), a silence is no timeout.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_FALSE(a.done()) << "an attached apply gave up";
  a.Detach();
  for (int i = 0; i < 500 && !a.done(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(a.done());
  ASSERT_TRUE(a.status().has_value());
  EXPECT_EQ(a.status()->code(), Code::kUnavailable) << a.status()->ToString();
  EXPECT_EQ(a.Push(std::move(chunks[1])).code(), Code::kUnavailable);
  ExpectBackAtPointOne();
}

TEST_F(StreamApplyTest, ARecordTheStoreRefusesEndsTheApply) {
  std::string next = image_;
  auto chunks = Chunks(2, 8, next);
  StreamApply a(*store_, 2, Info(2), StreamApplyOptions{});
  ASSERT_TRUE(a.Push(std::move(chunks[0])).ok());
  std::vector<DeltaRecord> bad;
  bad.push_back(DataRecord(0, kDiskSize - 4096, std::string(8192, 'x')));  // past the disk's end
  Status s = a.Push(std::move(bad));
  if (s.ok()) s = a.Finish();
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  ExpectBackAtPointOne();
}

TEST_F(StreamApplyTest, AnOutOfSequenceApplyFailsAtOnce) {
  StreamApply a(*store_, 5, Info(5), StreamApplyOptions{});
  Status s = a.Finish();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_EQ(store_->latest_sequence(), 1u);
}

TEST_F(StreamApplyTest, DestroyedBeforeFinishRollsBack) {
  std::string next = image_;
  auto chunks = Chunks(3, 8, next);
  {
    StreamApply a(*store_, 2, Info(2), StreamApplyOptions{});
    for (auto& c : chunks) ASSERT_TRUE(a.Push(std::move(c)).ok());
    WaitForDataOnDisk();
  }
  ExpectBackAtPointOne();
}

}  // namespace
}  // namespace vmreplica
