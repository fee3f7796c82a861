// Block hashing of real files and of the same bytes served over NBD by a
// real qemu-storage-daemon (spec: docs/export_format.md section 9).

#include "vmreplica/block_hash.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "blockio/qsd_testing.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

using blockio_testing::Qsd;
using blockio_testing::RunCommand;
using blockio_testing::TempDir;

constexpr uint32_t kBlock = 64u << 10;

// Random bytes with a few all-zero stretches (some block-aligned, some not).
std::string MakeDisk(uint64_t size, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::string d(size, '\0');
  for (uint64_t i = 0; i + 8 <= size; i += 8) {
    uint64_t v = rng();
    std::memcpy(&d[i], &v, 8);
  }
  for (int z = 0; z < 6; ++z) {
    const uint64_t off = rng() % size;
    const uint64_t len = std::min<uint64_t>(size - off, (z % 2 == 0 ? 4 * kBlock : 100000));
    d.replace(off, len, len, '\0');
  }
  d.replace(2 * kBlock, 3 * kBlock, 3 * kBlock, '\0');  // whole zero blocks for sure
  return d;
}

// Writes `bytes` as a sparse file: all-zero 64 KiB pieces become holes.
void WriteSparse(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  const std::string zeros(kBlock, '\0');
  for (uint64_t off = 0; off < bytes.size(); off += kBlock) {
    const uint64_t n = std::min<uint64_t>(kBlock, bytes.size() - off);
    if (n == kBlock && bytes.compare(off, n, zeros) == 0) {
      f.seekp(static_cast<std::streamoff>(off + n));
    } else {
      f.seekp(static_cast<std::streamoff>(off));
      f.write(bytes.data() + off, static_cast<std::streamsize>(n));
    }
  }
  f.close();
  ASSERT_EQ(truncate(path.c_str(), static_cast<off_t>(bytes.size())), 0);
}

// Hashes computed here straight from the bytes, independently of the hasher.
std::vector<Hash128> ReferenceHashes(const std::string& bytes) {
  std::vector<Hash128> out;
  for (uint64_t off = 0; off < bytes.size(); off += kBlock) {
    XXH128_hash_t h =
        XXH3_128bits(bytes.data() + off, std::min<uint64_t>(kBlock, bytes.size() - off));
    out.push_back(Hash128{h.high64, h.low64});
  }
  return out;
}

// A qemu-storage-daemon serving a qcow2 copy of `raw`. Fails (not skips)
// when QEMU is missing.
std::unique_ptr<Qsd> Serve(const TempDir& tmp, const std::string& raw, const std::string& name) {
  const std::string qcow = tmp.path() + "/" + name + ".qcow2";
  auto conv = RunCommand({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow});
  EXPECT_TRUE(conv.ok()) << "qemu-img is required: " << conv.status().ToString();
  if (!conv.ok()) return nullptr;
  const std::string dir = tmp.path() + "/" + name;
  EXPECT_TRUE(MakeDirs(dir).ok());
  auto qsd = Qsd::Start(dir, qcow, std::nullopt);
  EXPECT_TRUE(qsd.ok()) << "qemu-storage-daemon is required: " << qsd.status().ToString();
  if (!qsd.ok()) return nullptr;
  return std::move(qsd).value();
}

TEST(BlockHash, FileAndNbdExportGiveIdenticalLists) {
  TempDir tmp("vmr-bhash");
  ASSERT_TRUE(tmp.ok());
  const uint64_t size = (24u << 20) + 12288;  // a short last block
  const std::string bytes = MakeDisk(size, 1);
  const std::string raw = tmp.path() + "/disk.raw";
  WriteSparse(raw, bytes);
  const std::vector<Hash128> expected = ReferenceHashes(bytes);

  BlockHashOptions o;
  o.block_size = kBlock;
  o.parallelism = 3;
  BlockHashStats fstats;
  uint64_t last_progress = 0;
  auto flist = HashFileBlocks(raw, o, &fstats, [&](uint64_t done, uint64_t total) {
    EXPECT_EQ(total, size);
    last_progress = std::max(last_progress, done);
  });
  ASSERT_TRUE(flist.ok()) << flist.status().ToString();
  EXPECT_EQ(flist->hashes, expected);
  EXPECT_EQ(flist->disk_size, size);
  EXPECT_EQ(fstats.bytes_read + fstats.hole_bytes, size);
  EXPECT_EQ(last_progress, size);
  EXPECT_GE(fstats.zero_blocks, 3u);

  auto qsd = Serve(tmp, raw, "a");
  ASSERT_NE(qsd, nullptr);
  BlockHashStats nstats;
  o.parallelism = 8;
  auto nlist = HashNbdBlocks(qsd->socket(), qsd->export_name(), o, &nstats);
  ASSERT_TRUE(nlist.ok()) << nlist.status().ToString();
  EXPECT_EQ(nlist->disk_size, size);
  EXPECT_EQ(nlist->hashes, flist->hashes);
  EXPECT_EQ(nstats.bytes_read + nstats.hole_bytes, size);
  EXPECT_EQ(nstats.zero_blocks, fstats.zero_blocks);
  EXPECT_EQ(SerializeBlockHashes(*nlist), SerializeBlockHashes(*flist));
}

// Holes (a file's, or extents the NBD server reports as reading zeros) are
// hashed without being read, and hash as the zeros they read as.
TEST(BlockHash, HolesAreHashedWithoutBeingRead) {
  TempDir tmp("vmr-bhash");
  const uint64_t size = (24u << 20) + 12288;
  std::string bytes = MakeDisk(size, 31);
  bytes.replace(4u << 20, 8u << 20, 8u << 20, '\0');   // 8 requests of 1 MiB, all zeros
  bytes.replace(size - 12288, 12288, 12288, '\0');     // the short tail too
  const std::string raw = tmp.path() + "/disk.raw";
  WriteSparse(raw, bytes);
  const std::vector<Hash128> expected = ReferenceHashes(bytes);
  BlockHashStats fstats;
  auto flist = HashFileBlocks(raw, BlockHashOptions{}, &fstats);
  ASSERT_TRUE(flist.ok()) << flist.status().ToString();
  EXPECT_EQ(flist->hashes, expected);
  EXPECT_GE(fstats.hole_bytes, 8u << 20);
  EXPECT_EQ(fstats.bytes_read + fstats.hole_bytes, size);

  auto qsd = Serve(tmp, raw, "h");
  ASSERT_NE(qsd, nullptr);
  BlockHashStats nstats;
  auto nlist = HashNbdBlocks(qsd->socket(), qsd->export_name(), BlockHashOptions{}, &nstats);
  ASSERT_TRUE(nlist.ok()) << nlist.status().ToString();
  EXPECT_EQ(nlist->hashes, expected);
  EXPECT_GE(nstats.hole_bytes, 8u << 20);
  EXPECT_EQ(nstats.bytes_read + nstats.hole_bytes, size);
  std::printf("file: %llu bytes read, %llu hashed as holes; NBD: %llu read, %llu as zero extents\n",
              static_cast<unsigned long long>(fstats.bytes_read), static_cast<unsigned long long>(fstats.hole_bytes),
              static_cast<unsigned long long>(nstats.bytes_read), static_cast<unsigned long long>(nstats.hole_bytes));
}

TEST(BlockHash, DiffFindsExactlyTheChangedBlocks) {
  TempDir tmp("vmr-bhash");
  const uint64_t size = 32u << 20;
  const std::string a = MakeDisk(size, 2);
  std::string b = a;
  std::mt19937_64 rng(3);
  const uint64_t blocks = size / kBlock;
  std::set<uint64_t> changed;
  while (changed.size() < blocks / 100) changed.insert(rng() % blocks);
  changed.insert(blocks - 1);  // the last block too
  changed.insert(blocks - 2);  // and a run of two
  for (uint64_t blk : changed) {
    const uint64_t at = blk * kBlock + rng() % kBlock;
    b[at] = static_cast<char>(b[at] ^ 0x01);
  }
  const std::string pa = tmp.path() + "/a.raw", pb = tmp.path() + "/b.raw";
  WriteSparse(pa, a);
  WriteSparse(pb, b);

  BlockHashOptions o;
  auto la = HashFileBlocks(pa, o);
  ASSERT_TRUE(la.ok()) << la.status().ToString();
  // The other side over NBD, as in a seeded replication.
  auto qsd = Serve(tmp, pb, "b");
  ASSERT_NE(qsd, nullptr);
  BlockHashStats st;
  auto lb = HashNbdBlocks(qsd->socket(), qsd->export_name(), o, &st);
  ASSERT_TRUE(lb.ok()) << lb.status().ToString();
  EXPECT_EQ(st.bytes_read + st.hole_bytes, size);

  // Through the serialised form, as it travels.
  auto parsed = ParseBlockHashes(SerializeBlockHashes(*lb));
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  auto diff = DiffBlocks(*la, *parsed);
  ASSERT_TRUE(diff.ok()) << diff.status().ToString();
  std::set<uint64_t> found;
  uint64_t prev_end = 0;
  for (const BlockRange& r : *diff) {
    EXPECT_GT(r.block_count, 0u);
    EXPECT_EQ(r.offset, r.first_block * kBlock);
    EXPECT_EQ(r.length, std::min<uint64_t>(r.block_count * kBlock, size - r.offset));
    // Merged: runs never touch each other.
    if (r.first_block != 0) {
      EXPECT_GT(r.first_block, prev_end);
    }
    prev_end = r.first_block + r.block_count;
    for (uint64_t i = 0; i < r.block_count; ++i) found.insert(r.first_block + i);
  }
  EXPECT_EQ(found, changed);
  EXPECT_LT(diff->size(), changed.size());  // the run of two merged

  auto same = DiffBlocks(*la, *la);
  ASSERT_TRUE(same.ok());
  EXPECT_TRUE(same->empty());
}

TEST(BlockHash, ZeroBlocksHashLikeZerosFromTheOtherSide) {
  TempDir tmp("vmr-bhash");
  const std::string p = tmp.path() + "/holes.raw";
  const uint64_t size = (4u << 20) + 4096;
  ASSERT_EQ(truncate(std::string(p).c_str(), 0), -1);  // does not exist yet
  { std::ofstream(p, std::ios::binary); }
  ASSERT_EQ(truncate(p.c_str(), static_cast<off_t>(size)), 0);  // all hole
  BlockHashStats st;
  auto l = HashFileBlocks(p, BlockHashOptions{}, &st);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->hashes, ReferenceHashes(std::string(size, '\0')));
  EXPECT_EQ(st.zero_blocks, l->hashes.size());
  EXPECT_EQ(l->hashes.front(), HashOfZeros(kBlock));
  EXPECT_EQ(l->hashes.back(), HashOfZeros(4096));
  const std::string zeros(kBlock, '\0');
  EXPECT_EQ(HashOfZeros(kBlock), HashBytes(zeros.data(), zeros.size()));
}

TEST(BlockHash, SerialisedLayoutFollowsTheSpec) {
  BlockHashList l;
  l.block_size = 4096;
  l.disk_size = 10000;
  const std::string d1 = "abc";
  l.hashes = {HashBytes(d1.data(), 3), HashOfZeros(4096), HashOfZeros(1808)};
  const std::string s = SerializeBlockHashes(l);
  ASSERT_EQ(s.size(), 40u + 16 * 3 + 8);
  EXPECT_EQ(s.substr(0, 8), "VMRBHASH");
  auto le = [&](size_t at, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + i]);
    return v;
  };
  EXPECT_EQ(le(8, 4), 1u);
  EXPECT_EQ(le(12, 4), 4096u);
  EXPECT_EQ(le(16, 8), 10000u);
  EXPECT_EQ(le(24, 8), 0u);
  EXPECT_EQ(le(32, 8), 3u);
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, XXH3_128bits("abc", 3));
  EXPECT_EQ(s.substr(40, 16), std::string(reinterpret_cast<const char*>(c.digest), 16));
  EXPECT_EQ(le(s.size() - 8, 8), XXH3_64bits(s.data(), s.size() - 8));
  auto back = ParseBlockHashes(s);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->hashes, l.hashes);
  EXPECT_EQ(HashFromHex(HashToHex(l.hashes[0])).value(), l.hashes[0]);
}

// Rewrites the trailing checksum so only the edited field can be refused.
std::string Reseal(std::string s) {
  const uint64_t sum = XXH3_64bits(s.data(), s.size() - 8);
  for (int i = 0; i < 8; ++i) s[s.size() - 8 + i] = static_cast<char>((sum >> (8 * i)) & 0xff);
  return s;
}

TEST(BlockHash, MalformedListsAreRefused) {
  BlockHashList l;
  l.block_size = kBlock;
  l.disk_size = 5 * kBlock + 1;
  for (int i = 0; i < 6; ++i) l.hashes.push_back(HashOfZeros(static_cast<uint64_t>(i + 1)));
  const std::string good = SerializeBlockHashes(l);
  ASSERT_TRUE(ParseBlockHashes(good).ok());

  auto refused = [](const std::string& bytes, const std::string& needle) {
    auto r = ParseBlockHashes(bytes);
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  };
  refused(good.substr(0, good.size() - 1), "does not match its count");
  refused(good + "x", "does not match its count");
  refused(good.substr(0, 20), "shorter than its header");
  std::string s = good;
  s[0] = 'X';
  refused(s, "bad magic");
  s = good;
  s[40] ^= 1;
  refused(s, "checksum does not match");
  s = good;
  s[8] = 2;
  refused(Reseal(s), "unknown hash list version 2");
  s = good;
  s[12] = 1;  // block size 65537
  refused(Reseal(s), "not a power of two");
  s = good;
  s[16] = 0;  // disk size 5 blocks exactly: 5 blocks, count says 6
  refused(Reseal(s), "does not fit a disk");
  s = good;
  s[24] = 1;  // first block 1: blocks 1..6 of a 6-block disk
  refused(Reseal(s), "does not fit a disk");
  s = good;
  s[32] = static_cast<char>(0xff);  // count 255 with the length of 6
  refused(Reseal(s), "does not match its count");
}

// Seeded replication / resync in one pass: the replica hashes its copy (a
// file), the primary reads its disk over NBD once and sends only the blocks
// that differ; applying them makes the copy equal.
TEST(BlockHash, DiffSourceSendsOnlyDifferingBlocks) {
  TempDir tmp("vmr-bhash");
  const uint64_t size = (16u << 20) + 8192;
  const std::string primary = MakeDisk(size, 11);
  std::string replica = primary;
  std::mt19937_64 rng(12);
  const uint64_t blocks = (size + kBlock - 1) / kBlock;
  std::set<uint64_t> changed = {3, blocks - 1};  // block 3 is zero on the primary
  while (changed.size() < blocks / 100 + 2) changed.insert(rng() % blocks);
  uint64_t changed_bytes = 0;
  for (uint64_t blk : changed) {
    const uint64_t len = std::min<uint64_t>(kBlock, size - blk * kBlock);
    replica[blk * kBlock + rng() % len] ^= 0x40;
    changed_bytes += len;
  }
  const std::string pp = tmp.path() + "/primary.raw", rp = tmp.path() + "/replica.raw";
  WriteSparse(pp, primary);
  WriteSparse(rp, replica);
  auto remote = HashFileBlocks(rp, BlockHashOptions{});
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();
  auto qsd = Serve(tmp, pp, "p");
  ASSERT_NE(qsd, nullptr);
  auto src =
      NbdBlockDiffSource::Open(qsd->socket(), qsd->export_name(), 2, *remote, BlockHashOptions{});
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  std::set<uint64_t> sent;
  uint64_t last_end = 0;
  bool saw_zero = false;
  for (;;) {
    auto r = (*src)->Next();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (!r->has_value()) break;
    const DeltaRecord& rec = **r;
    EXPECT_EQ(rec.disk, 2u);
    EXPECT_GE(rec.offset, last_end);
    last_end = rec.offset + rec.length;
    if (rec.zero) {
      saw_zero = true;
      replica.replace(rec.offset, rec.length, rec.length, '\0');
    } else {
      replica.replace(rec.offset, rec.length, rec.data);
    }
    for (uint64_t b = rec.offset / kBlock; b * kBlock < rec.offset + rec.length; ++b)
      sent.insert(b);
  }
  EXPECT_EQ(sent, changed);
  EXPECT_TRUE(saw_zero);
  EXPECT_EQ((*src)->sent_bytes(), changed_bytes);
  EXPECT_EQ((*src)->stats().bytes_read + (*src)->stats().hole_bytes, size);
  EXPECT_TRUE(replica == primary);
  EXPECT_EQ((*src)->local().hashes, ReferenceHashes(primary));
  std::printf("sent %llu of %llu bytes (%.2f%%)\n", static_cast<unsigned long long>(changed_bytes),
              static_cast<unsigned long long>(size), 100.0 * changed_bytes / size);

  // A copy of another size is refused.
  BlockHashList other = *remote;
  other.disk_size += kBlock;
  other.hashes.push_back(HashOfZeros(kBlock));
  auto refused =
      NbdBlockDiffSource::Open(qsd->socket(), qsd->export_name(), 0, other, BlockHashOptions{});
  EXPECT_EQ(refused.status().code(), Code::kInvalidArgument) << refused.status().ToString();
}

// A paused resync continues with the blocks it has not hashed yet: a range
// reads only its own bytes and gives the same hashes as the whole pass.
TEST(BlockHash, RangeHashesOnlyItsBlocks) {
  TempDir tmp("vmr-bhash");
  const uint64_t size = (8u << 20) + 4096;
  const std::string bytes = MakeDisk(size, 9);
  const std::string p = tmp.path() + "/d.raw";
  WriteSparse(p, bytes);
  const std::vector<Hash128> all = ReferenceHashes(bytes);
  BlockHashOptions o;
  o.first_block = 100;
  o.block_count = 20;
  BlockHashStats st;
  auto part = HashFileBlocks(p, o, &st);
  ASSERT_TRUE(part.ok()) << part.status().ToString();
  EXPECT_EQ(part->first_block, 100u);
  EXPECT_EQ(st.bytes_read, 20u * kBlock);
  EXPECT_EQ(part->hashes, std::vector<Hash128>(all.begin() + 100, all.begin() + 120));
  // The tail: cut at the end of the disk, short last block included.
  o.first_block = all.size() - 3;
  o.block_count = 50;
  auto tail = HashFileBlocks(p, o, &st);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(st.bytes_read, 2 * kBlock + 4096);
  EXPECT_EQ(tail->hashes, std::vector<Hash128>(all.end() - 3, all.end()));
  auto parsed = ParseBlockHashes(SerializeBlockHashes(*tail));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->first_block, all.size() - 3);
  // Differences are reported in disk block numbers.
  BlockHashList other = *tail;
  other.hashes[1] = HashOfZeros(1);
  auto diff = DiffBlocks(*tail, other);
  ASSERT_TRUE(diff.ok());
  ASSERT_EQ(diff->size(), 1u);
  EXPECT_EQ((*diff)[0].first_block, all.size() - 2);
  EXPECT_EQ((*diff)[0].offset, (all.size() - 2) * kBlock);
  EXPECT_EQ(DiffBlocks(*tail, *part).status().code(), Code::kInvalidArgument);
  o.first_block = all.size();
  EXPECT_EQ(HashFileBlocks(p, o).status().code(), Code::kInvalidArgument);
}

// Drains a source; the records in order.
std::vector<DeltaRecord> Drain(DeltaSource& src) {
  std::vector<DeltaRecord> out;
  for (;;) {
    auto r = src.Next();
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok() || !r->has_value()) return out;
    out.push_back(std::move(**r));
  }
}

bool SameRecords(const std::vector<DeltaRecord>& a, const std::vector<DeltaRecord>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].disk != b[i].disk || a[i].offset != b[i].offset || a[i].length != b[i].length ||
        a[i].zero != b[i].zero || a[i].data != b[i].data)
      return false;
  }
  return true;
}

// The reverse sync reads several runs of one disk over one connection: the
// records are exactly those of one Open per run, whatever the runs and the
// request size.
TEST(BlockHash, OpenRunsGivesTheRecordsOfOneOpenPerRun) {
  TempDir tmp("vmr-bhash");
  ASSERT_TRUE(tmp.ok());
  const uint64_t size = (12u << 20) + 4096;  // a short last block
  const std::string primary = MakeDisk(size, 21);
  std::string replica = primary;
  std::mt19937_64 rng(22);
  const uint64_t blocks = (size + kBlock - 1) / kBlock;
  // Differences: single bytes, whole blocks zeroed on the primary's side
  // (the replica has data there), and the last block.
  for (int i = 0; i < 40; ++i) {
    const uint64_t blk = rng() % blocks;
    const uint64_t len = std::min<uint64_t>(kBlock, size - blk * kBlock);
    replica[blk * kBlock + rng() % len] ^= 0x11;
  }
  replica[size - 1] ^= 0x01;
  for (uint64_t blk : {2u, 3u}) replica[blk * kBlock + 17] = 'z';  // primary's blocks 2-4 are zeros
  const std::string pp = tmp.path() + "/primary.raw", rp = tmp.path() + "/replica.raw";
  WriteSparse(pp, primary);
  WriteSparse(rp, replica);
  auto qsd = Serve(tmp, pp, "p");
  ASSERT_NE(qsd, nullptr);
  const std::vector<Hash128> reference = ReferenceHashes(primary);

  size_t records_seen = 0;
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    BlockHashOptions o;
    const uint32_t requests[] = {64u << 10, 192u << 10, 1u << 20};
    o.request_bytes = requests[rng() % 3];
    o.parallelism = static_cast<uint32_t>(1 + rng() % 8);
    // Random runs: ascending, some touching, the last one sometimes at the end.
    std::vector<BlockHashList> runs;
    uint64_t at = rng() % 3;
    const int count = static_cast<int>(1 + rng() % 6);
    for (int k = 0; k < count && at < blocks; ++k) {
      BlockHashOptions ro = o;
      ro.first_block = at;
      ro.block_count = 1 + rng() % 40;
      if (k == count - 1 && round % 3 == 0) ro.block_count = 0;  // up to the end
      auto l = HashFileBlocks(rp, ro);
      ASSERT_TRUE(l.ok()) << l.status().ToString();
      at = l->first_block + l->hashes.size() + (rng() % 2 == 0 ? 0 : rng() % 30);
      runs.push_back(std::move(*l));
    }
    ASSERT_FALSE(runs.empty());

    std::vector<DeltaRecord> expected;
    uint64_t expected_bytes = 0;
    for (const BlockHashList& r : runs) {
      auto one = NbdBlockDiffSource::Open(qsd->socket(), qsd->export_name(), 3, r, o);
      ASSERT_TRUE(one.ok()) << one.status().ToString();
      std::vector<DeltaRecord> recs = Drain(**one);
      expected.insert(expected.end(), recs.begin(), recs.end());
      expected_bytes += (*one)->stats().bytes_read + (*one)->stats().hole_bytes;
    }
    auto many = NbdBlockDiffSource::OpenRuns(qsd->socket(), qsd->export_name(), 3, runs, o);
    ASSERT_TRUE(many.ok()) << many.status().ToString();
    const std::vector<DeltaRecord> got = Drain(**many);
    records_seen += got.size();
    EXPECT_TRUE(SameRecords(got, expected)) << got.size() << " records, " << expected.size()
                                            << " expected";
    // Once more after the end: still the end.
    auto again = (*many)->Next();
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(again->has_value());

    // Every run read once; this side's hashes are the bytes' own.
    uint64_t run_bytes = 0, sent = 0;
    ASSERT_EQ((*many)->local_runs().size(), runs.size());
    for (size_t k = 0; k < runs.size(); ++k) {
      const BlockHashList& l = (*many)->local_runs()[k];
      EXPECT_EQ(l.first_block, runs[k].first_block);
      const auto from = reference.begin() + static_cast<long>(l.first_block);
      EXPECT_EQ(l.hashes, std::vector<Hash128>(from, from + static_cast<long>(l.hashes.size())));
      run_bytes += std::min<uint64_t>((l.first_block + l.hashes.size()) * kBlock, size) -
                   l.first_block * kBlock;
    }
    for (const DeltaRecord& r : got) sent += r.length;
    EXPECT_EQ((*many)->stats().bytes_read + (*many)->stats().hole_bytes, run_bytes);
    EXPECT_EQ(run_bytes, expected_bytes);
    EXPECT_EQ((*many)->sent_bytes(), sent);
    EXPECT_EQ((*many)->local().first_block, runs[0].first_block);
  }
  EXPECT_GT(records_seen, 12u);  // the runs did cover differing blocks

  // Independently of Open: over every block of the disk in random runs that
  // tile it, the records turn the replica into the primary.
  {
    std::vector<BlockHashList> tiles;
    for (uint64_t at = 0; at < blocks;) {
      BlockHashOptions ro;
      ro.first_block = at;
      ro.block_count = 1 + rng() % 50;
      auto l = HashFileBlocks(rp, ro);
      ASSERT_TRUE(l.ok());
      at = l->first_block + l->hashes.size();
      tiles.push_back(std::move(*l));
    }
    auto src = NbdBlockDiffSource::OpenRuns(qsd->socket(), qsd->export_name(), 0, tiles,
                                            BlockHashOptions{});
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    std::string copy = replica;
    bool saw_zero = false;
    for (const DeltaRecord& r : Drain(**src)) {
      if (r.zero) {
        saw_zero = true;
        copy.replace(r.offset, r.length, r.length, '\0');
      } else {
        copy.replace(r.offset, r.length, r.data);
      }
    }
    EXPECT_TRUE(saw_zero);
    EXPECT_TRUE(copy == primary);
    EXPECT_EQ((*src)->stats().bytes_read + (*src)->stats().hole_bytes, size);
  }

  // No runs: nothing to send.
  auto none = NbdBlockDiffSource::OpenRuns(qsd->socket(), qsd->export_name(), 0, {},
                                           BlockHashOptions{});
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  auto end = (*none)->Next();
  ASSERT_TRUE(end.ok());
  EXPECT_FALSE(end->has_value());
  EXPECT_EQ((*none)->stats().bytes_read, 0u);
}

TEST(BlockHash, OpenRunsRefusesBadRuns) {
  TempDir tmp("vmr-bhash");
  ASSERT_TRUE(tmp.ok());
  const uint64_t size = 4u << 20;
  const std::string bytes = MakeDisk(size, 31);
  const std::string p = tmp.path() + "/d.raw";
  WriteSparse(p, bytes);
  auto qsd = Serve(tmp, p, "d");
  ASSERT_NE(qsd, nullptr);
  auto run = [&](uint64_t first, uint64_t count) {
    BlockHashOptions o;
    o.first_block = first;
    o.block_count = count;
    auto l = HashFileBlocks(p, o);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    return l.ok() ? *l : BlockHashList{};
  };
  auto refused = [&](std::vector<BlockHashList> runs, const std::string& needle) {
    auto r = NbdBlockDiffSource::OpenRuns(qsd->socket(), qsd->export_name(), 0, std::move(runs),
                                          BlockHashOptions{});
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().ToString();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  };
  // Touching runs are fine.
  EXPECT_TRUE(NbdBlockDiffSource::OpenRuns(qsd->socket(), qsd->export_name(), 0,
                                           {run(0, 4), run(4, 4)}, BlockHashOptions{})
                  .ok());
  refused({run(10, 4), run(2, 4)}, "run 1 starts at block 2");   // not ascending
  refused({run(0, 4), run(3, 4)}, "run 1 starts at block 3");    // overlapping
  refused({run(0, 4), run(4, 2), run(5, 1)}, "run 2 starts at block 5");
  BlockHashList other_size = run(8, 2);
  other_size.disk_size += kBlock;
  refused({run(0, 4), other_size}, "run 1: disk size");
  BlockHashList bigger = run(0, 2);
  bigger.disk_size += kBlock;  // same for every run, but not the export's
  refused({bigger}, "disk sizes differ");
  BlockHashList small_blocks = run(0, 2);
  small_blocks.block_size = kBlock / 2;
  small_blocks.hashes.resize(4);
  refused({small_blocks}, "run 0: block size");
  BlockHashList empty = run(0, 2);
  empty.hashes.clear();
  refused({run(0, 1), empty}, "run 1");
}

TEST(BlockHash, DiffRefusesDifferentShapes) {
  BlockHashList a;
  a.block_size = kBlock;
  a.disk_size = 2 * kBlock;
  a.hashes = {HashOfZeros(kBlock), HashOfZeros(kBlock)};
  BlockHashList b = a;
  b.disk_size = 2 * kBlock - 512;
  EXPECT_EQ(DiffBlocks(a, b).status().code(), Code::kInvalidArgument);
  b = a;
  b.block_size = kBlock / 2;
  b.hashes.resize(4);
  EXPECT_EQ(DiffBlocks(a, b).status().code(), Code::kInvalidArgument);
  b = a;
  b.hashes.pop_back();
  EXPECT_EQ(DiffBlocks(a, b).status().code(), Code::kInvalidArgument);
}

TEST(BlockHash, BadOptionsAndMissingFile) {
  TempDir tmp("vmr-bhash");
  BlockHashOptions o;
  o.block_size = 3000;
  EXPECT_EQ(HashFileBlocks("/etc/hostname", o).status().code(), Code::kInvalidArgument);
  o = BlockHashOptions{};
  o.parallelism = 0;
  EXPECT_EQ(HashFileBlocks("/etc/hostname", o).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(HashFileBlocks(tmp.path() + "/none", BlockHashOptions{}).status().code(),
            Code::kNotFound);
  EXPECT_EQ(HashNbdBlocks(tmp.path() + "/no.sock", "disk0", BlockHashOptions{}).status().code(),
            Code::kUnavailable);
}

TEST(BlockHash, CancelStopsHashing) {
  TempDir tmp("vmr-bhash");
  const std::string p = tmp.path() + "/d.raw";
  WriteSparse(p, MakeDisk(8u << 20, 5));
  std::atomic<bool> cancel{true};
  BlockHashOptions o;
  o.cancel = &cancel;
  EXPECT_EQ(HashFileBlocks(p, o).status().code(), Code::kCancelled);
}

// The other side's list fed in windows of 16 blocks while the source reads:
// the same records as with the whole list, every byte read once, and no
// record is handed out before the other side's hashes of its blocks came.
TEST(BlockHash, FedDiffSourceComparesAsTheListArrives) {
  TempDir tmp("vmr-bhash");
  const uint64_t size = (12u << 20) + 8192;
  const std::string primary = MakeDisk(size, 21);
  std::string replica = primary;
  std::mt19937_64 rng(22);
  const uint64_t blocks = (size + kBlock - 1) / kBlock;
  for (int i = 0; i < 12; ++i) replica[rng() % size] ^= 0x11;
  const std::string pp = tmp.path() + "/primary.raw", rp = tmp.path() + "/replica.raw";
  WriteSparse(pp, primary);
  WriteSparse(rp, replica);
  auto remote = HashFileBlocks(rp, BlockHashOptions{});
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();
  auto qsd = Serve(tmp, pp, "p");
  ASSERT_NE(qsd, nullptr);
  auto whole = NbdBlockDiffSource::Open(qsd->socket(), qsd->export_name(), 0, *remote, BlockHashOptions{});
  ASSERT_TRUE(whole.ok()) << whole.status().ToString();
  const std::vector<DeltaRecord> expected = Drain(**whole);
  ASSERT_FALSE(expected.empty());

  auto feed = std::make_shared<HashListFeed>(kBlock, std::vector<uint64_t>{size});
  auto fed = NbdBlockDiffSource::OpenFed(qsd->socket(), qsd->export_name(), 0, feed, BlockHashOptions{});
  ASSERT_TRUE(fed.ok()) << fed.status().ToString();
  std::atomic<uint64_t> arrived{0};
  std::thread producer([&] {
    for (uint64_t first = 0; first < blocks; first += 16) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      BlockHashList w = *remote;
      w.first_block = first;
      const uint64_t n = std::min<uint64_t>(16, blocks - first);
      w.hashes.assign(remote->hashes.begin() + static_cast<std::ptrdiff_t>(first),
                      remote->hashes.begin() + static_cast<std::ptrdiff_t>(first + n));
      arrived = first + n;
      EXPECT_TRUE(feed->Append(0, std::move(w)).ok());
    }
    feed->Finish(Status::Ok());
  });
  std::vector<DeltaRecord> got;
  for (;;) {
    auto r = (*fed)->Next();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (!r->has_value()) break;
    EXPECT_LE(((*r)->offset + (*r)->length + kBlock - 1) / kBlock, arrived.load()) << "compared before the hashes came";
    got.push_back(std::move(**r));
  }
  producer.join();
  EXPECT_TRUE(SameRecords(got, expected));
  EXPECT_EQ((*fed)->stats().bytes_read + (*fed)->stats().hole_bytes, size);
  EXPECT_TRUE(feed->Complete());
  auto lists = feed->Lists();
  ASSERT_TRUE(lists.ok());
  EXPECT_EQ((*lists)[0].hashes, remote->hashes);
}

// The feed takes lists only in order and of the right shape; its failure
// reaches the source; a wait can be cancelled.
TEST(BlockHash, FeedRefusesListsOutOfOrderAndPassesItsFailureOn) {
  const uint64_t size = 40 * uint64_t{kBlock};
  auto window = [&](uint64_t first, uint64_t n, uint64_t disk_size = 40 * uint64_t{kBlock}) {
    BlockHashList w;
    w.block_size = kBlock;
    w.disk_size = disk_size;
    w.first_block = first;
    w.hashes.assign(n, HashOfZeros(kBlock));
    return w;
  };
  {
    HashListFeed feed(kBlock, {size, size});
    ASSERT_TRUE(feed.Append(0, window(0, 10)).ok());
    EXPECT_EQ(feed.Append(1, window(0, 10)).code(), Code::kCorruption);  // disk 0 incomplete
    EXPECT_EQ(feed.Await(0, 10).status().code(), Code::kCorruption) << "a failed feed answers its failure";
  }
  {
    HashListFeed feed(kBlock, {size});
    ASSERT_TRUE(feed.Append(0, window(0, 10)).ok());
    EXPECT_EQ(feed.Append(0, window(12, 10)).code(), Code::kCorruption);  // a gap
    EXPECT_EQ(feed.Await(0, 20).status().code(), Code::kCorruption);
  }
  {
    HashListFeed feed(kBlock, {size});
    EXPECT_EQ(feed.Append(0, window(0, 10, size * 2)).code(), Code::kInvalidArgument);  // another disk size
  }
  {
    HashListFeed feed(kBlock, {size});
    ASSERT_TRUE(feed.Append(0, window(0, 30)).ok());
    feed.Finish(Status::Ok());  // ended early
    EXPECT_EQ(feed.Await(0, 40).status().code(), Code::kCorruption);
    EXPECT_FALSE(feed.Complete());
    EXPECT_EQ(feed.Lists().status().code(), Code::kFailedPrecondition);
  }
  {
    HashListFeed feed(kBlock, {size});
    EXPECT_EQ(feed.Await(0, 41).status().code(), Code::kInvalidArgument);
    EXPECT_EQ(feed.Await(0, 5, [] { return true; }).status().code(), Code::kCancelled);
    std::thread t([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      feed.Finish(Status::Unavailable("the replica went away"));
    });
    EXPECT_EQ(feed.Await(0, 5).status().code(), Code::kUnavailable);
    t.join();
  }

  // Through a source: the failure ends Next().
  TempDir tmp("vmr-bhash");
  const std::string pp = tmp.path() + "/primary.raw";
  WriteSparse(pp, MakeDisk(size, 23));
  auto qsd = Serve(tmp, pp, "p");
  ASSERT_NE(qsd, nullptr);
  auto feed = std::make_shared<HashListFeed>(kBlock, std::vector<uint64_t>{size});
  auto src = NbdBlockDiffSource::OpenFed(qsd->socket(), qsd->export_name(), 0, feed, BlockHashOptions{});
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  feed->Finish(Status::Unavailable("the replica went away"));
  EXPECT_EQ((*src)->Next().status().code(), Code::kUnavailable);
  // A feed of another disk size is refused at open.
  auto other = std::make_shared<HashListFeed>(kBlock, std::vector<uint64_t>{size + kBlock});
  EXPECT_EQ(NbdBlockDiffSource::OpenFed(qsd->socket(), qsd->export_name(), 0, other, BlockHashOptions{})
                .status()
                .code(),
            Code::kInvalidArgument);
}

}  // namespace
}  // namespace vmreplica
