// ReplicaClient: the sender side of docs/protocol.md "Data plane".
#include <spdlog/spdlog.h>
#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <limits>
#include <thread>

#include "protoconv/settings_convert.h"
#include "vmreplica/reverse.h"
#include "vmreplica/transfer.h"

namespace vmreplica {

namespace {

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

// The replica's answer; its state number is checked like any network input.
Result<ReplicaStatusInfo> FromProto(const v1::ReplicaStatus& p) {
  ReplicaStatusInfo s;
  s.expected_sequence = p.expected_sequence();
  s.latest_applied = p.latest_applied();
  s.last_apply_ms = p.last_apply_time_unix_ms();
  s.partial_sequence = p.partial_sequence();
  s.partial_chunks = p.partial_chunks();
  if (!p.latest_generation().empty()) {
    if (p.latest_generation().size() != 16) {
      return Status::Corruption("replica status: latest_generation of " +
                                std::to_string(p.latest_generation().size()) + " bytes, not 16");
    }
    GenerationId g{};
    std::copy(p.latest_generation().begin(), p.latest_generation().end(), g.begin());
    s.latest_generation = g;
  }
  auto state = Parse<ReplicationState>(std::to_string(p.state()));
  if (!state) {
    return Status::Corruption("replica status: state " + std::to_string(p.state()) +
                              " is not a ReplicationState number");
  }
  s.state = *state;
  return s;
}

constexpr size_t kMaxRangeBlobBytes = size_t{16} << 20;  // GetRangeHashes' `ranges`

// Merges neighbours on one disk (sorted by (disk, offset), not
// overlapping) whose gap is below `gap` bytes.
std::vector<ReplicaRange> MergeGaps(const std::vector<ReplicaRange>& in, uint64_t gap) {
  std::vector<ReplicaRange> out;
  for (const ReplicaRange& r : in) {
    if (!out.empty() && out.back().disk == r.disk && r.offset - (out.back().offset + out.back().length) < gap) {
      out.back().length = r.offset + r.length - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

size_t BlobBytes(size_t entries) { return kRangeListHeaderBytes + 32 * entries + 8; }

// The `ranges` blob of a RangeHashRequest for `candidates` on `disk_count`
// disks (1..64): range list v1, kind 1, the ranges rounded out to 4 KiB,
// united and sorted; when the blob would exceed kMaxRangeBlobBytes,
// neighbours closer than 1 MiB, then 16 MiB, then twice that ... are
// merged until it fits (a superset). InvalidArgument for a range on a disk
// >= disk_count or a bad disk_count.
Result<std::string> EncodeCandidateRanges(const std::vector<ReplicaRange>& candidates, uint32_t disk_count) {
  if (disk_count == 0 || disk_count > kRangeListMaxDisks) {
    return Status::InvalidArgument("disk_count " + std::to_string(disk_count) + " is not 1..64");
  }
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  std::vector<ReplicaRange> rounded;
  rounded.reserve(candidates.size());
  for (const ReplicaRange& r : candidates) {
    if (r.disk >= disk_count) {
      return Status::InvalidArgument("candidate on disk " + std::to_string(r.disk) + " of " +
                                     std::to_string(disk_count));
    }
    if (r.length == 0) continue;
    // Rounded out to 4 KiB; an end past the last aligned offset is clamped there.
    const uint64_t start = r.offset / kRangeListAlign * kRangeListAlign;
    const uint64_t last = kMax / kRangeListAlign * kRangeListAlign;
    const uint64_t end_raw = r.length > kMax - r.offset ? kMax : r.offset + r.length;
    const uint64_t end = end_raw > last ? last : (end_raw + kRangeListAlign - 1) / kRangeListAlign * kRangeListAlign;
    if (end <= start) continue;
    rounded.push_back(ReplicaRange{r.disk, start, end - start});
  }
  std::vector<ReplicaRange> united = UniteRanges(std::move(rounded), {});
  for (uint64_t gap = uint64_t{1} << 20; BlobBytes(united.size()) > kMaxRangeBlobBytes && gap != 0;
       gap = gap == (uint64_t{1} << 20) ? (uint64_t{16} << 20) : gap << 1) {
    united = MergeGaps(united, gap);
  }
  // Unreachable in practice: at the widest gap a disk keeps at most two ranges.
  if (BlobBytes(united.size()) > kMaxRangeBlobBytes) return Status::InvalidArgument("candidates too scattered");
  SinceList list;
  list.entries.reserve(united.size());
  for (const ReplicaRange& r : united) list.entries.push_back(RangeEntry{r.disk, r.offset, r.length, 0});
  return SerializeRangeList(kRangeListCandidates, disk_count, list);
}

// Chunks made ahead of the sender (each up to SendOptions::chunk_bytes).
constexpr size_t kChunksMadeAhead = 4;

struct Chunk {
  uint64_t index = 0;
  v1::DeltaMessage message;  // the chunk as written (payload possibly mutated by a test hook)
};

// Cuts the source's records into chunk bodies. Reads the source once.
class Chunker {
 public:
  Chunker(DeltaSource& source, const SendOptions& options, SendStats* stats)
      : source_(source), options_(options), stats_(stats) {
    if (options.continuation) {
      next_index_ = options.continuation->index + 1;
      stats_->records = options.continuation->records;
      stats_->data_bytes = options.continuation->data_bytes;
      stats_->zero_bytes = options.continuation->zero_bytes;
    }
  }

  // The next chunk, or nullopt at the end of the source.
  Result<std::optional<Chunk>> Next() {
    v1::ChunkBody body;
    uint64_t data = 0;
    while (data < options_.chunk_bytes && body.records_size() < 65536) {
      if (abandoned_ != nullptr && abandoned_->load()) return Status::Cancelled("the send was abandoned");
      if (!carry_) {
        if (eof_) break;
        VMR_ASSIGN_OR_RETURN(auto r, source_.Next());
        if (!r) {
          eof_ = true;
          break;
        }
        carry_ = std::move(*r);
      }
      DeltaRecord& r = *carry_;
      last_disk_ = r.disk;
      auto* out = body.add_records();
      out->set_disk(r.disk);
      out->set_offset(r.offset);
      if (r.zero) {
        out->set_length(r.length);
        out->set_zero(true);
        last_end_ = r.offset + r.length;
        stats_->zero_bytes += r.length;
        data += 32;
        carry_.reset();
      } else {
        if (r.data.size() != r.length)
          return Status::InvalidArgument("a data record's payload differs from its length");
        const uint64_t room = options_.chunk_bytes - std::min<uint64_t>(data, options_.chunk_bytes);
        const uint64_t take = std::min<uint64_t>(r.length, std::max<uint64_t>(room, 1));
        out->set_length(take);
        last_end_ = r.offset + take;
        if (take == r.length) {
          out->set_data(std::move(r.data));
          carry_.reset();
        } else {
          out->set_data(r.data.substr(0, take));
          r.data.erase(0, take);
          r.offset += take;
          r.length -= take;
        }
        stats_->data_bytes += take;
        data += take;
      }
      ++stats_->records;
    }
    if (body.records_size() == 0) return std::optional<Chunk>();
    Chunk c;
    c.index = next_index_++;
    if (options_.on_chunk) {
      options_.on_chunk(ChunkMark{c.index, stats_->records, stats_->data_bytes, stats_->zero_bytes, last_disk_,
                                  last_end_});
    }
    auto* m = c.message.mutable_chunk();
    m->set_index(c.index);
    std::string raw;
    if (!body.SerializeToString(&raw)) return Status::Internal("cannot serialise a chunk");
    // The records' bytes are in `raw` now: their buffers go back to the
    // source for its next reads (DeltaSource::Recycle).
    for (auto& rec : *body.mutable_records()) {
      if (!rec.zero()) source_.Recycle(std::move(*rec.mutable_data()));
    }
    if (raw.size() > kMaxChunkBodyBytes) return Status::Internal("chunk body over the limit");
    m->set_raw_size(static_cast<uint32_t>(raw.size()));
    m->set_checksum(XXH3_64bits(raw.data(), raw.size()));
    if (options_.compress) {
      // One compression context and output buffer for the whole stream: a
      // fresh context (ZSTD_compress) and a zero-filled buffer per chunk
      // cost page faults and memsets on every chunk.
      if (!cctx_) cctx_.reset(ZSTD_createCCtx());
      if (!cctx_) return Status::Internal("ZSTD_createCCtx failed");
      const size_t bound = ZSTD_compressBound(raw.size());
      if (zbuf_.size() < bound) zbuf_.resize(bound);
      if (last_incompressible_ && !ProbeCompresses(raw)) {
        ++stats_->compression_skipped;
      } else {
        size_t n = ZSTD_compressCCtx(cctx_.get(), zbuf_.data(), bound, raw.data(), raw.size(), 1);
        last_incompressible_ = ZSTD_isError(n) || n > raw.size() - raw.size() / 32;
        if (!ZSTD_isError(n) && n < raw.size()) {
          m->set_compression(1);
          m->set_payload(zbuf_.data(), n);
          ++stats_->chunks;
          return std::optional<Chunk>(std::move(c));
        }
      }
    }
    m->set_compression(0);
    m->set_payload(std::move(raw));
    ++stats_->chunks;
    return std::optional<Chunk>(std::move(c));
  }

  uint64_t chunks_made() const { return next_index_; }
  bool done() const { return eof_ && !carry_; }
  // Checked between records: once set, Next() stops with Cancelled.
  void set_abandoned_flag(const std::atomic<bool>* f) { abandoned_ = f; }

 private:
  // After a chunk that did not compress (by 1/32 or more), the next one is
  // compressed whole only when one of kProbes slices spread over it does
  // (each 1/16 of the chunk, at most 16 KiB): random or already compressed
  // data (a VM's encrypted or compressed files, media) then costs the probes
  // instead of a whole zstd pass. docs/protocol.md "PushDelta".
  static constexpr size_t kProbes = 4;
  bool ProbeCompresses(const std::string& raw) {
    const size_t slice = std::min<size_t>(16 << 10, raw.size() / 16);
    if (slice < 1024) return true;
    for (size_t i = 0; i < kProbes; ++i) {
      const size_t at = raw.size() / kProbes * i;
      const size_t n = ZSTD_compressCCtx(cctx_.get(), zbuf_.data(), zbuf_.size(), raw.data() + at, slice, 1);
      if (!ZSTD_isError(n) && n <= slice - slice / 32) return true;
    }
    return false;
  }

  DeltaSource& source_;
  const SendOptions& options_;
  SendStats* stats_;
  std::optional<DeltaRecord> carry_;  // the rest of a split data record
  bool eof_ = false;
  uint64_t next_index_ = 0;
  uint32_t last_disk_ = 0;  // where the last record taken ends
  uint64_t last_end_ = 0;
  std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx_{nullptr, ZSTD_freeCCtx};
  std::string zbuf_;  // compressed chunk, reused
  const std::atomic<bool>* abandoned_ = nullptr;
  bool last_incompressible_ = false;  // the last chunk compressed whole saved under 1/32
};

// Makes the next chunks on a thread of its own, up to `depth` ahead of the
// sender: reading the source, serialising, hashing and compressing a chunk
// overlap the write (gRPC, TLS, socket) of the one before. The thread starts
// with the first Next() (a send refused at its start reads nothing). The
// chunker and the source are used by that thread only while it runs;
// Finish() or Abandon() join it, after which the stats it filled may be
// read.
class ChunkPrefetcher {
 public:
  ChunkPrefetcher(Chunker& chunker, size_t depth, std::function<void()> on_abandon)
      : chunker_(chunker), depth_(depth), on_abandon_(std::move(on_abandon)), next_index_(chunker.chunks_made()) {
    chunker_.set_abandoned_flag(&abandoned_);
  }
  ~ChunkPrefetcher() { Abandon(); }
  ChunkPrefetcher(const ChunkPrefetcher&) = delete;
  ChunkPrefetcher& operator=(const ChunkPrefetcher&) = delete;

  // The next chunk in order, nullopt at the end of the source, or the
  // source's (or the chunker's) error, which stays.
  Result<std::optional<Chunk>> Next() {
    std::unique_lock<std::mutex> l(mu_);
    if (!thread_.joinable() && !end_ && error_.ok()) thread_ = std::thread([this] { Run(); });
    cv_.wait(l, [&] { return !ready_.empty() || end_ || !error_.ok(); });
    if (!ready_.empty()) {
      Chunk c = std::move(ready_.front());
      ready_.pop_front();
      ++next_index_;
      cv_.notify_all();
      return std::optional<Chunk>(std::move(c));
    }
    if (!error_.ok()) return error_;
    return std::optional<Chunk>();
  }

  // The index the next chunk handed out will have (chunks handed out so
  // far, counted from the continuation's start).
  uint64_t next_index() {
    std::lock_guard<std::mutex> l(mu_);
    return next_index_;
  }

  // Joins the thread after Next() returned the end of the source.
  void Finish() {
    if (thread_.joinable()) thread_.join();
  }

  // Stops making chunks: a thread still inside the source is told to
  // return (the chunker's flag between records, SendOptions::abandon for a
  // source that waits or scans), then joined.
  void Abandon() {
    bool running = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      running = thread_.joinable() && !end_ && error_.ok();
    }
    abandoned_ = true;
    cv_.notify_all();
    if (running && on_abandon_) on_abandon_();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || ready_.size() < depth_; });
        if (stop_) return;
      }
      auto made = chunker_.Next();
      std::lock_guard<std::mutex> l(mu_);
      if (!made.ok()) {
        error_ = made.status();
      } else if (!*made) {
        end_ = true;
      } else {
        ready_.push_back(std::move(**made));
      }
      cv_.notify_all();
      if (!error_.ok() || end_) return;
    }
  }

  Chunker& chunker_;
  const size_t depth_;
  const std::function<void()> on_abandon_;
  std::atomic<bool> abandoned_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> ready_;
  Status error_;
  bool end_ = false;
  bool stop_ = false;
  uint64_t next_index_;
  std::thread thread_;
};

// Replies of one stream, filled by its reader thread.
struct ReplyState {
  std::mutex mu;
  std::condition_variable cv;
  bool started = false;
  uint64_t resume_chunk = 0;
  uint64_t acked = 0;
  bool committed = false;
  bool done = false;     // the reader saw the end of the stream
  uint64_t replies = 0;  // every reply, heartbeats included (a sign of life)
};

}  // namespace

ReplicaClient::ReplicaClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)), stub_(v1::ReplicaPeer::NewStub(channel_)) {}

Result<ReplicaStatusInfo> ReplicaClient::CreateReplica(const CreateReplicaParams& params) {
  v1::CreateReplicaRequest req;
  req.set_vm_id(params.vm_id);
  req.set_relationship_index(0);
  req.set_vm_name(params.vm_name);
  req.set_definition_json(params.definition_json);
  for (const auto& d : params.disks) {
    auto* p = req.add_disks();
    p->set_name(d.name);
    p->set_size_bytes(d.size);
  }
  RelationshipSettingsToProto(params.settings, req.mutable_settings());
  req.set_primary_address(params.settings.primary_connection_point);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::ReplicaStatus resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->CreateReplica(&ctx, req, &resp)).WithContext("CreateReplica"));
  return FromProto(resp);
}

Result<PrepareReverseAnswer> ReplicaClient::PrepareReverse(const PrepareReverseParams& p) {
  v1::PrepareReverseRequest req;
  req.set_vm_id(p.vm_id);
  req.set_request_id(p.request_id);
  req.set_purpose(p.purpose);
  req.set_vm_name(p.vm_name);
  for (const auto& d : p.disks) {
    auto* spec = req.add_disks();
    spec->set_name(d.name);
    spec->set_size_bytes(d.size);
  }
  RelationshipSettingsToProto(p.settings, req.mutable_settings());
  req.set_primary_address(p.primary_address);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::PrepareReverseResponse resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->PrepareReverse(&ctx, req, &resp)).WithContext("PrepareReverse"));
  PrepareReverseAnswer a;
  if (resp.phase() != 1 && resp.phase() != 2) {
    return Status::Corruption("PrepareReverse: phase " + std::to_string(resp.phase()) + " is not 1 or 2");
  }
  if (resp.job_id().size() > 256) return Status::Corruption("PrepareReverse: job_id over 256 bytes");
  a.done = resp.phase() == 2;
  a.job_id = resp.job_id();
  if (!a.done) return a;
  if (resp.generation().size() != a.claim.generation.size()) {
    return Status::Corruption("PrepareReverse: the generation is not 16 bytes");
  }
  std::copy(resp.generation().begin(), resp.generation().end(), a.claim.generation.begin());
  if (resp.tracking() != 1 && resp.tracking() != 2) {
    return Status::Corruption("PrepareReverse: tracking " + std::to_string(resp.tracking()) + " is not 1 or 2");
  }
  a.claim.tracking_intact = resp.tracking() == 1;
  a.claim.common_sequence = resp.common_sequence();
  a.claim.candidate_bytes = resp.candidate_bytes();
  a.claim.local_copy_bytes = resp.local_copy_bytes();
  if (!resp.has_status()) return Status::Corruption("PrepareReverse: phase 2 without the replica's status");
  VMR_ASSIGN_OR_RETURN(a.status, FromProto(resp.status()));
  return a;
}

Result<ReplicaStatusInfo> ReplicaClient::GetReplicaStatus(const std::string& vm_id, uint32_t relationship_index) {
  v1::ReplicaRef req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::ReplicaStatus resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->GetReplicaStatus(&ctx, req, &resp)).WithContext("GetReplicaStatus"));
  return FromProto(resp);
}

Status ReplicaClient::RemoveReplica(const std::string& vm_id, uint32_t relationship_index) {
  v1::ReplicaRef req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::RemoveReplicaResponse resp;
  return StatusFromGrpc(stub_->RemoveReplica(&ctx, req, &resp)).WithContext("RemoveReplica");
}

Result<ReplicaStatusInfo> ReplicaClient::ModifyReplica(const std::string& vm_id, uint32_t relationship_index,
                                                       const RelationshipSettings& settings) {
  v1::ModifyReplicaRequest req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  RelationshipSettingsToProto(settings, req.mutable_settings());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::ReplicaStatus resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->ModifyReplica(&ctx, req, &resp)).WithContext("ModifyReplica"));
  return FromProto(resp);
}

Result<ReplicaClient::PrimaryVmState> ReplicaClient::GetPrimaryVmState(const std::string& vm_id) {
  v1::PrimaryVmQuery req;
  req.set_vm_id(vm_id);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::PrimaryVmState resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->GetPrimaryVmState(&ctx, req, &resp)).WithContext("GetPrimaryVmState"));
  if (resp.run_state() > 2 || resp.replication_state() > 21 || resp.detail().size() > 4096) {
    return Status::Corruption("GetPrimaryVmState: answer out of range");
  }
  return PrimaryVmState{static_cast<int>(resp.run_state()), resp.replication_state(), resp.detail()};
}

Result<ReplicaStatusInfo> ReplicaClient::ReserveImport(const std::string& vm_id, uint32_t relationship_index,
                                                       const GenerationId& generation, bool release) {
  v1::ReserveImportRequest req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  req.set_generation(std::string(reinterpret_cast<const char*>(generation.data()), generation.size()));
  req.set_release(release);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, unary_timeout_);
  v1::ReplicaStatus resp;
  VMR_RETURN_IF_ERROR(StatusFromGrpc(stub_->ReserveImport(&ctx, req, &resp)).WithContext("ReserveImport"));
  return FromProto(resp);
}

std::unique_ptr<BlockHashFetch> ReplicaClient::FetchBlockHashes(const std::string& vm_id,
                                                                uint32_t relationship_index, uint32_t window_blocks,
                                                                std::shared_ptr<HashListFeed> feed) {
  v1::BlockHashRequest req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  req.set_block_size(feed->block_size());
  req.set_window_blocks(window_blocks);
  return std::make_unique<BlockHashFetch>(stub_.get(), std::move(req), std::move(feed));
}

BlockHashFetch::BlockHashFetch(v1::ReplicaPeer::Stub* stub, v1::BlockHashRequest request,
                               std::shared_ptr<HashListFeed> feed)
    : stub_(stub), request_(std::move(request)), feed_(std::move(feed)) {
  // Hashing reads every replica disk once: no short deadline.
  ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::hours(12));
  thread_ = std::thread([this] {
    Status s = Run();
    feed_->Finish(s);
    outcome_ = s;
  });
}

BlockHashFetch::~BlockHashFetch() {
  if (thread_.joinable()) {
    ctx_.TryCancel();
    thread_.join();
  }
}

void BlockHashFetch::Cancel() { ctx_.TryCancel(); }

Status BlockHashFetch::Wait() {
  if (thread_.joinable()) thread_.join();
  return outcome_;
}

Status BlockHashFetch::Run() {
  auto reader = stub_->GetBlockHashes(&ctx_, request_);
  const uint32_t bs = feed_->block_size();
  const uint32_t disks = feed_->disk_count();
  constexpr size_t kMaxListBytes = size_t{1} << 30;
  uint32_t disk = 0;
  uint64_t next_block = 0;  // of `disk`: where its next list must start
  size_t disk_bytes = 0;
  std::string current;
  v1::BlockHashPiece piece;
  auto fail = [&](Status why) {
    ctx_.TryCancel();
    reader->Finish().ok();
    return why.WithContext("GetBlockHashes");
  };
  while (reader->Read(&piece)) {
    if (piece.disk() >= disks) {
      return fail(Status::FailedPrecondition("the replica sends hashes of disk " + std::to_string(piece.disk()) +
                                             "; this side has " + std::to_string(disks) + " disks"));
    }
    if (piece.disk() != disk) {
      return fail(Status::Corruption("disk " + std::to_string(piece.disk()) + " out of order (disk " +
                                     std::to_string(disk) + " is incomplete)"));
    }
    disk_bytes += piece.data().size();
    if (disk_bytes > kMaxListBytes) return fail(Status::Corruption("a hash list over 1 GiB"));
    current += piece.data();
    if (!piece.end_of_run() && !piece.end_of_disk()) continue;
    auto list = ParseBlockHashes(current);
    current.clear();
    if (!list.ok()) {
      return fail(Status::Corruption("disk " + std::to_string(disk) + ": " + list.status().message()));
    }
    if (list->block_size != bs) return fail(Status::Corruption("a list of another block size"));
    next_block = list->first_block + list->hashes.size();
    if (Status a = feed_->Append(disk, std::move(*list)); !a.ok()) return fail(a);
    if (piece.end_of_disk()) {
      // Blocks outside the lists would never be compared.
      if (next_block != (feed_->disk_size(disk) + bs - 1) / bs) {
        return fail(Status::Corruption("disk " + std::to_string(disk) +
                                       ": the lists do not cover the whole disk (they end at block " +
                                       std::to_string(next_block) + ")"));
      }
      ++disk;
      next_block = 0;
      disk_bytes = 0;
    }
  }
  VMR_RETURN_IF_ERROR(StatusFromGrpc(reader->Finish()).WithContext("GetBlockHashes"));
  if (!current.empty()) return Status::Corruption("GetBlockHashes: the last list ended early");
  if (disk != disks) {
    return Status::FailedPrecondition("GetBlockHashes: the replica has " + std::to_string(disk) +
                                      " disks, this side " + std::to_string(disks));
  }
  return Status::Ok();
}

Result<std::vector<std::vector<BlockHashList>>> ReplicaClient::GetRangeHashes(
    const std::string& vm_id, uint32_t relationship_index, uint32_t block_size,
    const std::vector<ReplicaRange>* candidates, uint32_t disk_count) {
  if (disk_count == 0 || disk_count > kLogMaxDisks) {
    return Status::InvalidArgument("disk_count " + std::to_string(disk_count) + " is not 1..64");
  }
  v1::RangeHashRequest req;
  req.set_vm_id(vm_id);
  req.set_relationship_index(relationship_index);
  req.set_block_size(block_size);
  if (candidates == nullptr) {
    req.set_all_blocks(true);
  } else {
    VMR_ASSIGN_OR_RETURN(std::string blob, EncodeCandidateRanges(*candidates, disk_count));
    req.set_ranges(std::move(blob));
  }
  grpc::ClientContext ctx;
  // Hashing reads the candidate runs (maybe every disk) once: no short deadline.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::hours(12));
  auto reader = stub_->GetRangeHashes(&ctx, req);
  auto refuse = [&](const std::string& why) -> Status {
    ctx.TryCancel();
    reader->Finish().ok();  // the refusal is ours; the stream's own end no longer matters
    return Status::Corruption("GetRangeHashes: " + why);
  };
  std::vector<std::vector<BlockHashList>> disks(disk_count);
  constexpr size_t kMaxListBytes = size_t{1} << 30;
  size_t total = 0;
  std::string current;     // the run being received
  int64_t disk = -1;       // the disk of the pieces so far (-1: none yet)
  bool disk_open = false;  // `disk` has runs and its end_of_disk has not come yet
  v1::BlockHashPiece piece;
  while (reader->Read(&piece)) {
    const std::string d = "disk " + std::to_string(piece.disk());
    if (piece.disk() >= disk_count) return refuse(d + " of " + std::to_string(disk_count));
    if (disk_open ? static_cast<int64_t>(piece.disk()) != disk : static_cast<int64_t>(piece.disk()) <= disk) {
      return refuse(d + " out of order");
    }
    if (piece.data().empty()) return refuse(d + ": an empty piece");
    if (piece.end_of_disk() && !piece.end_of_run()) return refuse(d + ": end_of_disk inside a run");
    if (total + piece.data().size() > kMaxListBytes) return refuse("over 1 GiB of hash lists");
    total += piece.data().size();
    disk = piece.disk();
    disk_open = true;
    current += piece.data();
    if (!piece.end_of_run()) continue;
    std::vector<BlockHashList>& runs = disks[piece.disk()];
    const std::string r = d + " run " + std::to_string(runs.size());
    auto list = ParseBlockHashes(current);
    current.clear();
    if (!list.ok()) return refuse(r + ": " + list.status().message());
    if (list->block_size != block_size) return refuse(r + ": a list of another block size");
    if (!runs.empty()) {
      const BlockHashList& prev = runs.back();
      if (list->disk_size != prev.disk_size) return refuse(r + ": another disk size than the disk's first run");
      if (list->first_block < prev.first_block + prev.hashes.size()) {
        return refuse(r + ": not after the previous run (ascending, not overlapping)");
      }
    }
    // ParseBlockHashes checked first_block + count against the disk's blocks.
    runs.push_back(std::move(*list));
    if (piece.end_of_disk()) disk_open = false;
  }
  VMR_RETURN_IF_ERROR(StatusFromGrpc(reader->Finish()).WithContext("GetRangeHashes"));
  if (!current.empty()) return Status::Corruption("GetRangeHashes: the last run ended early");
  if (disk_open) {
    return Status::Corruption("GetRangeHashes: disk " + std::to_string(disk) + " ended without end_of_disk");
  }
  return disks;
}

Result<SendStats> ReplicaClient::SendDelta(const DeltaInfo& info, DeltaSource& source, const SendOptions& options) {
  if (options.chunk_bytes < 4096 || options.chunk_bytes > (16u << 20)) {
    return Status::InvalidArgument("chunk_bytes must be 4 KiB .. 16 MiB");
  }
  if (options.max_attempts < 1) return Status::InvalidArgument("max_attempts must be >= 1");
  if (info.sequence == 0) return Status::InvalidArgument("sequence 0 is not a log");

  v1::DeltaMessage start_msg;
  auto* st = start_msg.mutable_start();
  st->set_vm_id(info.vm_id);
  st->set_relationship_index(info.relationship_index);
  st->set_sequence(info.sequence);
  st->set_base_generation(std::string(info.base_generation.begin(), info.base_generation.end()));
  st->set_new_generation(std::string(info.new_generation.begin(), info.new_generation.end()));
  st->set_cut_time_unix_ms(info.cut_time_unix_ms);
  st->set_kind(static_cast<uint32_t>(info.kind));
  st->set_initial(info.initial);

  SendStats stats;
  Chunker chunker(source, options, &stats);
  ChunkPrefetcher prefetch(chunker, kChunksMadeAhead, options.abandon);
  std::deque<Chunk> window;  // written, not yet acknowledged, oldest first
  uint64_t bytes_sent = 0;
  Status last = Status::Unavailable("no attempt made");

  for (int attempt = 1; attempt <= options.max_attempts; ++attempt) {
    if (attempt > 1) {
      ++stats.resumed;
      // Back-off before reconnecting (not a synchronisation).
      std::this_thread::sleep_for(std::chrono::milliseconds(100 * (attempt - 1)));
    }
    grpc::ClientContext ctx;
    auto stream = stub_->PushDelta(&ctx);
    ReplyState rs;
    std::thread reader([&] {
      v1::DeltaReply r;
      while (stream->Read(&r)) {
        std::lock_guard<std::mutex> l(rs.mu);
        if (r.started()) {
          rs.started = true;
          rs.resume_chunk = r.resume_chunk();
          rs.acked = std::max(rs.acked, r.resume_chunk());
        }
        rs.acked = std::max(rs.acked, r.acked_chunks());
        if (r.committed()) rs.committed = true;
        ++rs.replies;
        rs.cv.notify_all();
      }
      std::lock_guard<std::mutex> l(rs.mu);
      rs.done = true;
      rs.cv.notify_all();
    });
    // Set when this side must end the stream (no progress in time, a test
    // break); otherwise the replica ended it and Finish() tells why.
    bool cancel = false;
    // Waits until `pred` holds; false when the stream ended first or after
    // rpc_timeout without any reply (then the stream is to be cancelled). A
    // reply that does not make `pred` hold (the replica repeating its last
    // ack while its store writes) starts the timeout again.
    auto wait_for = [&](auto pred) {
      std::unique_lock<std::mutex> l(rs.mu);
      for (;;) {
        const uint64_t seen = rs.replies;
        if (!rs.cv.wait_for(l, options.rpc_timeout, [&] { return pred() || rs.done || rs.replies != seen; })) {
          cancel = true;
          break;
        }
        if (pred() || rs.done) break;
      }
      return pred();
    };
    auto holds = [&](auto pred) {
      std::lock_guard<std::mutex> l(rs.mu);
      return pred();
    };
    auto drop_acked = [&] {
      std::lock_guard<std::mutex> l(rs.mu);
      while (!window.empty() && window.front().index < rs.acked) window.pop_front();
    };

    Status attempt_status;  // a non-retryable error found here
    bool broken = false;
    bool committed = false;
    if (!stream->Write(start_msg)) {
      broken = true;
    } else if (!wait_for([&] { return rs.started; })) {
      broken = true;
    } else if (holds([&] { return rs.committed; })) {
      committed = true;  // an earlier attempt's commit answer was lost
    } else {
      const uint64_t resume = holds([&] { return rs.resume_chunk; });
      const uint64_t oldest = window.empty() ? prefetch.next_index() : window.front().index;
      if (options.continuation && attempt == 1 && resume != options.continuation->index + 1) {
        attempt_status = Status::Unavailable("the replica lost the partial log (it holds " + std::to_string(resume) +
                                             " chunks, the continuation follows chunk " +
                                             std::to_string(options.continuation->index) + ")");
      } else if (resume < oldest) {
        attempt_status =
            Status::Unavailable("the replica lost the partial log (it wants chunk " + std::to_string(resume) +
                                ", the oldest kept is " + std::to_string(oldest) + "): send the delta again");
      } else if (resume > prefetch.next_index()) {
        attempt_status = Status::Internal("the replica wants chunk " + std::to_string(resume) + " of " +
                                          std::to_string(prefetch.next_index()) + " sent");
      } else {
        while (!window.empty() && window.front().index < resume) window.pop_front();
        // Resend the window, then new chunks; each write waits for room.
        size_t next_in_window = 0;
        while (attempt_status.ok() && !broken) {
          drop_acked();
          const Chunk* c = nullptr;
          // Index of the next chunk to write in this attempt.
          uint64_t want = resume + next_in_window;
          {
            // chunks already in the window are resent first
            auto it = std::find_if(window.begin(), window.end(), [&](const Chunk& k) { return k.index == want; });
            if (it != window.end()) c = &*it;
          }
          if (c == nullptr) {
            if (window.size() >= kMaxChunksInFlight) {
              if (!wait_for([&] { return !window.empty() && rs.acked > window.front().index; })) {
                broken = true;
                break;
              }
              continue;
            }
            auto made = prefetch.Next();
            if (!made.ok()) {
              attempt_status = made.status();
              break;
            }
            if (!*made) break;  // end of the source
            window.push_back(std::move(**made));
            c = &window.back();
            if (test_hooks_.mutate_payload) {
              test_hooks_.mutate_payload(c->index, window.back().message.mutable_chunk()->mutable_payload());
            }
          }
          const uint64_t n = c->message.chunk().payload().size();
          if (options.throttle) options.throttle(n);
          if (!stream->Write(c->message)) {
            broken = true;
            break;
          }
          bytes_sent += n;
          stats.wire_bytes += n;
          if (options.progress) options.progress(bytes_sent);
          ++next_in_window;
          const uint64_t acked_now = holds([&] { return rs.acked; });
          if (test_hooks_.break_after_chunk && test_hooks_.break_after_chunk(c->index, attempt, acked_now)) {
            cancel = true;
            broken = true;
            break;
          }
        }
        if (attempt_status.ok() && !broken) {
          prefetch.Finish();  // at the end of the source: the stats are complete
          v1::DeltaMessage end;
          end.mutable_end()->set_chunk_count(prefetch.next_index());
          end.mutable_end()->set_record_count(stats.records);
          end.mutable_end()->set_data_bytes(stats.data_bytes);
          end.mutable_end()->set_zero_bytes(stats.zero_bytes);
          if (!stream->Write(end) || !wait_for([&] { return rs.committed; })) {
            broken = true;
          } else {
            committed = true;
          }
        }
      }
    }
    if (committed) {
      stream->WritesDone();
    } else if (cancel || !attempt_status.ok()) {
      ctx.TryCancel();
    } else {
      // The replica ended the stream (or the connection broke): the reader
      // sees the end; cancel only when it does not within the timeout.
      std::unique_lock<std::mutex> l(rs.mu);
      if (!rs.cv.wait_for(l, options.rpc_timeout, [&] { return rs.done; })) ctx.TryCancel();
    }
    reader.join();
    grpc::Status gs = stream->Finish();
    if (committed) {
      prefetch.Abandon();  // a commit found at the start: the thread may still be making chunks
      return stats;
    }
    if (!attempt_status.ok()) return attempt_status;
    Status s = StatusFromGrpc(gs);
    if (s.ok()) s = Status::Unavailable("the stream ended before the replica committed the log");
    if (s.code() != Code::kUnavailable && s.code() != Code::kTimeout) return s;
    drop_acked();
    last = s;
    spdlog::warn("delta {} of {}: attempt {} broke ({}); {} chunk(s) unacknowledged", info.sequence, info.vm_id,
                 attempt, s.ToString(), window.size());
  }
  return Status::Unavailable("delta " + std::to_string(info.sequence) + " not acknowledged after " +
                             std::to_string(options.max_attempts) + " attempts: " + last.message());
}

}  // namespace vmreplica
