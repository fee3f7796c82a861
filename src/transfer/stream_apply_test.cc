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
    auto store = ReplicaStore::Create(dir_ + "/store", kVm, {{"vda", kDiskSize}}, nullptr, ReplicaStoreOptions{});
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

  void ExpectBackAtPointOne() {
    EXPECT_EQ(store_->latest_sequence(), 1u);
    EXPECT_TRUE(Read(1) == image_) << "point 1 changed";
    // The store takes log 2 again afterwards.
    std::string next = image_;
    auto chunks = Chunks(1, 3, next);
    VectorDeltaSource src(chunks[0]);
    ASSERT_TRUE(store_->Apply(2, Info(2), src).ok());
    EXPECT_TRUE(Read(2) == next);
  }

  std::string dir_;
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

TEST_F(StreamApplyTest, CancelRollsBackAndLaterCallsAnswerTheReason) {
  std::string next = image_;
  auto chunks = Chunks(6, 8, next);
  StreamApply a(*store_, 2, Info(2), StreamApplyOptions{});
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(a.Push(std::move(chunks[i])).ok());
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
  }
  ExpectBackAtPointOne();
}

}  // namespace
}  // namespace vmreplica
