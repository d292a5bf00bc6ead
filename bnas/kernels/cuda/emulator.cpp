// Host warp emulator of the CUDA XNOR kernels (used by the tests; never by the fast paths).
//
// It runs the BNAS_HD kernel bodies of xnor_conv.cuh unchanged, with EmuCtx in place of the
// device context: every CUDA thread of a block is a cooperative fiber (ucontext) with its own
// stack and registers, shared memory is one byte array per block, and
//   - __syncthreads is a barrier: no thread passes until every live thread of the block
//     has arrived (a barrier reached after some thread exited is reported as an error);
//   - the warp-collective instructions (the 1-bit mma, ldmatrix.x4) park each
//     lane with its operands; once all 32 lanes of the warp arrived at the same instruction
//     (same kind, same per-lane count of collective calls) it is carried out for the whole
//     warp: the mma by the exact software model of mma.m16n8k256 .b1 .and.popc (mma_b1.cuh),
//     ldmatrix by the PTX rule (lane l gives row l % 8 of matrix l / 8, lane (g, t) receives
//     word t of row g of each matrix);
//   - cp.async copies are queued per thread and land in shared memory only at the
//     cp.async.wait_group that retires their commit group, so a wait/commit accounting
//     mistake reads stale or poisoned shared memory, as it would on the device;
//   - shared memory starts filled with a poison pattern, and every global load/store is
//     checked against the tensors passed in.
// Exposed through a C ABI (loaded with ctypes by bnas/kernels/emulator.py).
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "mma_b1.cuh"
#include "tiles.h"
#include "xnor_conv.cuh"

namespace bnas_cuda {
namespace emu {

struct Span {
  const uint8_t* lo;
  const uint8_t* hi;
  bool writable;
};

class EmuError {
 public:
  explicit EmuError(std::string m) : msg(std::move(m)) {}
  std::string msg;
};

enum class State { Ready, AtSync, AtWarp, Done };
enum class WarpOp { Mma, Ldsm };

struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  int bytes;
  bool pred;
};

class BlockRunner;

// The per-thread context the kernel bodies see (same interface as DeviceCtx).
class EmuCtx {
 public:
  BlockRunner* run = nullptr;
  int thread = 0;

  int tid() const { return thread; }
  int block_x() const;
  int block_y() const;
  int block_z() const;
  uint8_t* smem() const;
  void sync();
  void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]);
  void ldsm_x4(uint32_t r[4], const uint32_t* row);
  void atomic_or_shared(uint32_t* p, uint32_t v) {
    check_shared(p, 4, 4);
    *p |= v;   // fibers never interleave inside this call
  }
  template <int BYTES>
  void cp_async(void* dst, const void* src, bool pred);
  void cp_commit();
  template <int N>
  void cp_wait() { wait_groups(N); }
  template <class T>
  T ld(const T* p) const {
    check_global(p, sizeof(T), false);
    return *p;
  }
  template <class T>
  void st(T* p, T v) const {
    check_global(p, sizeof(T), true);
    *p = v;
  }
  void atomic_or(uint32_t* p, uint32_t v) const {
    check_global(p, sizeof(uint32_t), true);
    *p |= v;   // fibers never interleave inside this call
  }
  void red_add(int32_t* p, int32_t v) const {
    check_global(p, sizeof(int32_t), true);
    *p += v;
  }
  int atomic_add(int32_t* p, int32_t v) const {
    check_global(p, sizeof(int32_t), true);
    const int old = *p;
    *p += v;
    return old;
  }
  void fence() const {}   // blocks run one after another here: every write is already visible
  int32_t ld_l2(const int32_t* p) const { return ld(p); }

  // emulator state of this thread
  State state = State::Ready;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  long warp_calls = 0;          // collective instructions reached so far
  WarpOp op = WarpOp::Mma;
  uint32_t a_reg[4] = {0, 0, 0, 0}, b_reg[2] = {0, 0};
  int32_t c_reg[4] = {0, 0, 0, 0};
  const uint8_t* ldsm_row = nullptr;
  uint32_t ldsm_reg[4] = {0, 0, 0, 0};

 private:
  void wait_groups(int keep);
  void check_shared(const void* p, size_t bytes, size_t align);
  void arrive(WarpOp kind);
  void check_global(const void* p, size_t bytes, bool write) const;
};

class BlockRunner {
 public:
  BlockRunner(int threads, size_t smem_bytes, std::vector<Span> spans)
      : threads_(threads), spans_(std::move(spans)), smem_(smem_bytes + 16), ctxs_(threads),
        fibers_(threads), stacks_(threads) {
    for (int i = 0; i < threads; ++i) {
      ctxs_[i].run = this;
      ctxs_[i].thread = i;
      stacks_[i].resize(kStackBytes);
    }
  }

  // Runs one block to completion; throws EmuError on a detected problem.
  void run_block(int bx, int by, int bz, const std::function<void(EmuCtx&)>& body) {
    bx_ = bx;
    by_ = by;
    bz_ = bz;
    body_ = &body;
    error_.clear();
    std::memset(smem_.data(), 0xA5, smem_.size());   // shared memory starts as garbage
    for (int i = 0; i < threads_; ++i) {
      EmuCtx& c = ctxs_[i];
      c.state = State::Ready;
      c.groups.clear();
      c.open.clear();
      c.warp_calls = 0;
      getcontext(&fibers_[i]);
      fibers_[i].uc_stack.ss_sp = stacks_[i].data();
      fibers_[i].uc_stack.ss_size = stacks_[i].size();
      fibers_[i].uc_link = nullptr;
      makecontext(&fibers_[i], reinterpret_cast<void (*)()>(&BlockRunner::entry), 0);
    }
    for (;;) {
      bool ran = false;
      for (int i = 0; i < threads_; ++i) {
        if (ctxs_[i].state != State::Ready) continue;
        current_ = i;
        active_ = this;
        swapcontext(&main_, &fibers_[i]);
        ran = true;
        if (!error_.empty()) throw EmuError(error_);
      }
      if (resolve_warp_ops()) continue;
      int live = 0, at_sync = 0, done = 0;
      for (const EmuCtx& c : ctxs_) {
        if (c.state == State::Done) ++done;
        else ++live;
        if (c.state == State::AtSync) ++at_sync;
      }
      if (live == 0) return;
      if (at_sync == live) {
        if (done > 0) throw EmuError("__syncthreads reached after some threads of the block exited");
        for (EmuCtx& c : ctxs_) c.state = State::Ready;
        continue;
      }
      if (!ran)
        throw EmuError("deadlock: some threads wait at __syncthreads while others wait in a warp-collective "
                       "instruction (divergent mma.sync / ldmatrix or barrier)");
    }
  }

  uint8_t* smem() { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_.data()) + 15) & ~uintptr_t(15)); }
  size_t smem_size() const { return smem_.size() - 16; }
  int bx() const { return bx_; }
  int by() const { return by_; }
  int bz() const { return bz_; }
  const std::vector<Span>& spans() const { return spans_; }

  // Called from a fiber: park it in `s` and return to the scheduler.
  void park(EmuCtx& c, State s) {
    c.state = s;
    swapcontext(&fibers_[c.thread], &main_);
  }
  [[noreturn]] void fail(EmuCtx& c, const std::string& msg) {
    if (error_.empty()) error_ = msg;
    c.state = State::Done;
    setcontext(&main_);
    __builtin_unreachable();
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  static void entry() {
    BlockRunner* r = active_;
    EmuCtx& c = r->ctxs_[r->current_];
    (*r->body_)(c);
    c.state = State::Done;
    if (!c.groups.empty() || !c.open.empty()) {
      // copies never waited for: harmless on the device only if nobody reads them; the kernels
      // always drain with cp.async.wait_group 0, so treat leftovers as a bug.
      if (r->error_.empty()) r->error_ = "thread exited with cp.async copies never waited for";
    }
    setcontext(&r->main_);
  }

  // Completes every warp whose 32 lanes all wait in a collective instruction.  Returns
  // whether any did.
  bool resolve_warp_ops() {
    bool any = false;
    for (int w0 = 0; w0 < threads_; w0 += 32) {
      int at = 0;
      for (int l = 0; l < 32; ++l) at += ctxs_[w0 + l].state == State::AtWarp;
      if (at == 0) continue;
      if (at < 32) {
        bool others_blocked = true;
        for (int l = 0; l < 32; ++l)
          if (ctxs_[w0 + l].state == State::Ready) others_blocked = false;
        if (others_blocked) {
          char buf[160];
          std::snprintf(buf, sizeof buf,
                        "warp %d: a warp-collective instruction reached by %d of 32 lanes (the others are at a "
                        "barrier or exited)", w0 / 32, at);
          throw EmuError(buf);
        }
        continue;
      }
      const EmuCtx& first = ctxs_[w0];
      for (int l = 0; l < 32; ++l) {
        const EmuCtx& x = ctxs_[w0 + l];
        if (x.warp_calls != first.warp_calls || x.op != first.op)
          throw EmuError("lanes of one warp met at different warp-collective instructions");
      }
      if (first.op == WarpOp::Mma) {
        uint32_t a[32][4], b[32][2];
        int32_t c[32][4], d[32][4];
        for (int l = 0; l < 32; ++l) {
          const EmuCtx& x = ctxs_[w0 + l];
          std::memcpy(a[l], x.a_reg, sizeof a[l]);
          std::memcpy(b[l], x.b_reg, sizeof b[l]);
          std::memcpy(c[l], x.c_reg, sizeof c[l]);
        }
        mma_m16n8k256_b1_and_popc_model(a, b, c, d);
        for (int l = 0; l < 32; ++l) std::memcpy(ctxs_[w0 + l].c_reg, d[l], sizeof d[l]);
      } else {
        for (int l = 0; l < 32; ++l)
          for (int j = 0; j < 4; ++j)
            std::memcpy(&ctxs_[w0 + l].ldsm_reg[j], ctxs_[w0 + 8 * j + l / 4].ldsm_row + 4 * (l % 4), 4);
      }
      for (int l = 0; l < 32; ++l) ctxs_[w0 + l].state = State::Ready;
      any = true;
    }
    return any;
  }

  int threads_;
  std::vector<Span> spans_;
  std::vector<uint8_t> smem_;
  std::vector<EmuCtx> ctxs_;
  std::vector<ucontext_t> fibers_;
  std::vector<std::vector<char>> stacks_;
  ucontext_t main_;
  int current_ = 0, bx_ = 0, by_ = 0, bz_ = 0;
  const std::function<void(EmuCtx&)>* body_ = nullptr;
  std::string error_;
  static thread_local BlockRunner* active_;
};

thread_local BlockRunner* BlockRunner::active_ = nullptr;

int EmuCtx::block_x() const { return run->bx(); }
int EmuCtx::block_y() const { return run->by(); }
int EmuCtx::block_z() const { return run->bz(); }
uint8_t* EmuCtx::smem() const { return run->smem(); }
void EmuCtx::sync() { run->park(*this, State::AtSync); }

void EmuCtx::arrive(WarpOp kind) {
  op = kind;
  ++warp_calls;
  run->park(*this, State::AtWarp);
}

void EmuCtx::mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
  std::memcpy(a_reg, a, sizeof a_reg);
  std::memcpy(b_reg, b, sizeof b_reg);
  std::memcpy(c_reg, c, sizeof c_reg);
  arrive(WarpOp::Mma);
  std::memcpy(c, c_reg, sizeof c_reg);
}

void EmuCtx::ldsm_x4(uint32_t r[4], const uint32_t* row) {
  check_shared(row, 16, 16);   // one 16-byte matrix row, 16-byte aligned (PTX ldmatrix)
  ldsm_row = reinterpret_cast<const uint8_t*>(row);
  arrive(WarpOp::Ldsm);
  std::memcpy(r, ldsm_reg, sizeof ldsm_reg);
}

void EmuCtx::check_shared(const void* p, size_t bytes, size_t align) {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (q < run->smem() || q + bytes > run->smem() + run->smem_size())
    run->fail(*this, "shared-memory access outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(q) % align != 0) run->fail(*this, "shared-memory access not aligned");
}

template <int BYTES>
void EmuCtx::cp_async(void* dst, const void* src, bool pred) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async size");
  uint8_t* d = static_cast<uint8_t*>(dst);
  if (d < run->smem() || d + BYTES > run->smem() + run->smem_size())
    run->fail(*this, "cp.async destination outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(d) % BYTES != 0 || reinterpret_cast<uintptr_t>(src) % BYTES != 0)
    run->fail(*this, "cp.async address not aligned to the copy size");
  if (pred) check_global(src, BYTES, false);
  open.push_back(Copy{d, static_cast<const uint8_t*>(src), BYTES, pred});
}

void EmuCtx::cp_commit() {
  groups.push_back(open);
  open.clear();
}

void EmuCtx::wait_groups(int keep) {
  while ((int)groups.size() > keep) {
    for (const Copy& c : groups.front()) {
      if (c.pred) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
    groups.erase(groups.begin());
  }
}

void EmuCtx::check_global(const void* p, size_t bytes, bool write) const {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  for (const Span& s : run->spans())
    if (q >= s.lo && q + bytes <= s.hi) {
      if (write && !s.writable) break;
      return;
    }
  run->fail(const_cast<EmuCtx&>(*this), write ? "global store outside the output tensors" : "global load outside the input tensors");
}

// 16-bit storage types the emulator packs (the device reads __half / __nv_bfloat16), with the
// kernel's own raw-bits sign rule.
struct HostHalf { uint16_t bits; };
struct HostBf16 { uint16_t bits; };
inline bool sign_is_plus(HostHalf v) { return sign_is_plus_bits16(v.bits, kHalfManBits); }
inline bool sign_is_plus(HostBf16 v) { return sign_is_plus_bits16(v.bits, kBf16ManBits); }

// A context for the barrier-free pack kernel: bounds-checked loads and stores only.
struct PlainCtx {
  std::vector<Span> spans;
  std::string error;
  bool inside(const void* p, size_t n, bool write) const {
    const uint8_t* q = static_cast<const uint8_t*>(p);
    for (const Span& s : spans)
      if (q >= s.lo && q + n <= s.hi && (s.writable || !write)) return true;
    return false;
  }
  template <class T>
  T ld(const T* p) {
    if (!inside(p, sizeof(T), false)) throw EmuError("pack: load outside the input tensor");
    return *p;
  }
  template <class T>
  void st(T* p, T v) {
    if (!inside(p, sizeof(T), true)) throw EmuError("pack: store outside the output tensor");
    *p = v;
  }
};

template <class Tile>
void run_conv(const ConvArgs& a, const std::vector<Span>& spans) {
  const ConvShape& s = a.s;
  const ConvSmem L = conv_smem_layout<Tile>(s.T);
  BlockRunner runner(Tile::THREADS, L.total, spans);
  const std::function<void(EmuCtx&)> body = [&a](EmuCtx& c) { xnor_conv_block<Tile>(a, c); };
  const int gx = ceil_div(s.M, Tile::BM), gy = s.G * ceil_div(s.Kg, Tile::BN);
  // split-K slices of a tile run in reverse order, so the epilogue is not always slice 0's
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx)
      for (int bz = a.splits - 1; bz >= 0; --bz) runner.run_block(bx, by, bz, body);
}

template <template <int> class TileOf>
void run_conv_vw(const ConvArgs& a, int vw, const std::vector<Span>& spans) {
  switch (vw) {
    case 4: run_conv<TileOf<4>>(a, spans); break;
    case 2: run_conv<TileOf<2>>(a, spans); break;
    default: run_conv<TileOf<1>>(a, spans); break;
  }
}

void set_error(char* err, int errlen, const std::string& msg) {
  if (err && errlen > 0) std::snprintf(err, (size_t)errlen, "%s", msg.c_str());
}

Span span_of(const void* p, int64_t bytes, bool writable) {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  return Span{q, q + bytes, writable};
}

}  // namespace emu
}  // namespace bnas_cuda

using namespace bnas_cuda;

extern "C" {

// One warp-wide mma.m16n8k256 .b1 .and.popc through the software model.
// a: 32x4 words, b: 32x2 words, c and d: 32x4 int32, in lane-major order.
int bnas_emu_mma(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d) {
  mma_m16n8k256_b1_and_popc_model(reinterpret_cast<const uint32_t(*)[4]>(a), reinterpret_cast<const uint32_t(*)[2]>(b),
                                  reinterpret_cast<const int32_t(*)[4]>(c), reinterpret_cast<int32_t(*)[4]>(d));
  return 0;
}

int bnas_emu_conv_dims_count() { return kDimCount; }

// Output spatial size and packed-output words per pixel for dims (or an error).
int bnas_emu_conv_shape(const int64_t* dims, int64_t* out4, char* err, int errlen) {
  ConvShape s;
  if (const char* e = conv_shape_from_dims(dims, s)) {
    emu::set_error(err, errlen, e);
    return 1;
  }
  out4[0] = s.OH;
  out4[1] = s.OW;
  out4[2] = s.out_GW;
  out4[3] = s.Wg;
  return 0;
}

// Emulated launch of the conv kernel, mirroring launch_xnor_conv: tile = 0 small, 1 large,
// -1 the launcher's rule for `sm_count` SMs; vw = 1/2/4 words per copy, 0 the launcher's rule.
// x_words / w_words: sizes of the packed tensors in words (for bounds checks).
int bnas_emu_conv(const uint32_t* x, int64_t x_words, const uint32_t* w, int64_t w_words, const int32_t* tap_sums,
                  const float* scale, const float* bias, float* out, uint32_t* out_packed, const int64_t* dims, int tile,
                  int vw, int sm_count, int splits, char* err, int errlen) {
  ConvArgs a;
  if (const char* e = conv_shape_from_dims(dims, a.s)) {
    emu::set_error(err, errlen, e);
    return 1;
  }
  const ConvShape& s = a.s;
  a.x = x; a.w = w; a.scale = scale; a.bias = bias; a.out = out; a.out_packed = out_packed;
  if (x_words != (int64_t)s.N * s.H * s.W * s.GW || w_words != (int64_t)s.K * s.Q) {
    emu::set_error(err, errlen, "packed tensor sizes do not match the conv dims");
    return 1;
  }
  std::vector<emu::Span> spans = {emu::span_of(x, x_words * 4, false), emu::span_of(w, w_words * 4, false)};
  if (scale) spans.push_back(emu::span_of(scale, (int64_t)s.K * 4, false));
  if (bias) spans.push_back(emu::span_of(bias, (int64_t)s.K * 4, false));
  // outputs start as poison (NaN / 0xFFFFFFFF) so an element the kernel never writes shows up;
  // the packed output is zeroed exactly when the launcher zeroes it
  if (out) {
    spans.push_back(emu::span_of(out, (int64_t)s.M * s.K * 4, true));
    std::memset(out, 0xFF, sizeof(float) * (size_t)s.M * s.K);
  }
  if (out_packed) {
    spans.push_back(emu::span_of(out_packed, (int64_t)s.M * s.out_GW * 4, true));
    std::memset(out_packed, packed_output_needs_zeroing(s) ? 0 : 0xFF, sizeof(uint32_t) * (size_t)s.M * s.out_GW);
  }
  if (vw == 0) vw = copy_width(s, x, w);
  if (vw != 1 && vw != 2 && vw != 4) {
    emu::set_error(err, errlen, "vw must be 0, 1, 2 or 4");
    return 1;
  }
  if (s.Wg % vw != 0) {
    emu::set_error(err, errlen, "vw must divide the words per group");
    return 1;
  }
  bool large = tile < 0 ? use_large_tile(s, sm_count) : tile == 1;
  // what the GPU path does first: the weights' tap sums (unless given; cuda_backend keeps them
  // per weight tensor), and a copy of the activations with stray bits past the channel count
  // cleared (Cg % 32 != 0)
  std::vector<int32_t> sums((size_t)s.K * s.T);
  std::vector<uint32_t> clean;
  try {
    emu::PlainCtx plain;
    if (tap_sums) {
      std::memcpy(sums.data(), tap_sums, sums.size() * 4);
    } else {
      plain.spans = {emu::span_of(w, w_words * 4, false), emu::span_of(sums.data(), (int64_t)sums.size() * 4, true)};
      TapSumArgs ts{w, sums.data(), s.T, s.Wg, s.Cg, (int64_t)s.K * s.T};
      for (int64_t i = 0; i < ts.total; ++i) conv_tap_sum(ts, i, plain);
    }
    if (activations_need_tail_clearing(s)) {
      clean.resize((size_t)x_words);
      plain.spans = {emu::span_of(x, x_words * 4, false), emu::span_of(clean.data(), x_words * 4, true)};
      for (int64_t i = 0; i < x_words; ++i) clear_tail_bits_word(x, clean.data(), s.Wg, tail_word_mask(s.Cg), i, plain);
      a.x = clean.data();
      spans[0] = emu::span_of(clean.data(), x_words * 4, false);
    }
  } catch (const emu::EmuError& e) {
    emu::set_error(err, errlen, e.msg);
    return 2;
  }
  a.tap_sums = sums.data();
  spans.push_back(emu::span_of(sums.data(), (int64_t)sums.size() * 4, false));
  // split-K as the launcher picks it (splits 0), or forced; it always runs the small tile
  if (splits == 0) splits = tile < 0 ? conv_splits(s, sm_count) : 1;
  if (splits < 1 || splits > kMaxSplits) {
    emu::set_error(err, errlen, "splits must be 0 (the launcher's rule) or 1..8");
    return 1;
  }
  std::vector<int32_t> split_ws(splits > 1 ? (size_t)split_workspace_ints(s) : 0, 0);
  set_split_workspace(a, splits, split_ws.data());
  if (splits > 1) spans.push_back(emu::span_of(split_ws.data(), (int64_t)split_ws.size() * 4, true));
  if (a.splits > 1) large = false;
  try {
    if (large) emu::run_conv_vw<LargeTile>(a, vw, spans);
    else emu::run_conv_vw<SmallTile>(a, vw, spans);
  } catch (const emu::EmuError& e) {
    emu::set_error(err, errlen, e.msg);
    return 2;
  }
  return 0;
}

// The launcher's split-K choice (1 = none) for conv dims on a GPU with sm_count SMs.
int bnas_emu_conv_splits(const int64_t* dims, int sm_count) {
  ConvShape s;
  if (conv_shape_from_dims(dims, s)) return -1;
  return conv_splits(s, sm_count);
}

// The launcher's tile for conv dims on a GPU with sm_count SMs: 1 large, 0 small.
int bnas_emu_conv_large_tile(const int64_t* dims, int sm_count) {
  ConvShape s;
  if (conv_shape_from_dims(dims, s)) return -1;
  return use_large_tile(s, sm_count) ? 1 : 0;
}

// The tap-sum kernel (one entry per thread on the device) for packed weights of conv dims.
int bnas_emu_tap_sums(const uint32_t* w, int64_t w_words, const int64_t* dims, int32_t* out, int64_t out_len, char* err,
                      int errlen) {
  ConvShape s;
  if (const char* e = conv_shape_from_dims(dims, s)) {
    emu::set_error(err, errlen, e);
    return 1;
  }
  if (w_words != (int64_t)s.K * s.Q || out_len != (int64_t)s.K * s.T) {
    emu::set_error(err, errlen, "tap sums: tensor sizes do not match the conv dims");
    return 1;
  }
  emu::PlainCtx plain;
  plain.spans = {emu::span_of(w, w_words * 4, false), emu::span_of(out, out_len * 4, true)};
  TapSumArgs ts{w, out, s.T, s.Wg, s.Cg, out_len};
  try {
    for (int64_t i = 0; i < ts.total; ++i) conv_tap_sum(ts, i, plain);
  } catch (const emu::EmuError& e) {
    emu::set_error(err, errlen, e.msg);
    return 2;
  }
  return 0;
}

// Worst shared-memory bank conflict (ways) of the ldmatrix fragment loads of one tile
// configuration (0 small, 1 large), over every warp, depth step and ldmatrix.x4, with the
// row addresses the kernel itself computes (a_ldsm_word / b_ldsm_word).  ldmatrix reads one
// 8x16-byte matrix per phase; a phase's ways = the most distinct 16-byte rows that fall into
// the same 16-byte bank group of a 128-byte line.  1 = conflict-free.
int bnas_emu_fragment_bank_ways(int tile) {
  auto ways = [](auto tile_tag) {
    using Tile = decltype(tile_tag);
    int worst = 0;
    auto phase_ways = [&](const int (&words)[32], int base) {
      for (int mat = 0; mat < 4; ++mat) {
        std::vector<std::vector<int>> group(8);
        for (int r = 0; r < 8; ++r) {
          const int addr = base + words[8 * mat + r];   // in words, 16-byte aligned
          std::vector<int>& gr = group[(addr / 4) % 8];
          bool seen = false;
          for (int v : gr) seen |= v == addr;
          if (!seen) gr.push_back(addr);
        }
        for (const auto& gr : group) worst = gr.size() > (size_t)worst ? (int)gr.size() : worst;
      }
    };
    for (int warp = 0; warp < Tile::WARPS; ++warp) {
      const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
      for (int ks = 0; ks < Tile::KSTEPS; ++ks) {
        int words[32];
        for (int mt = 0; mt < Tile::MT; ++mt) {
          for (int lane = 0; lane < 32; ++lane) words[lane] = a_ldsm_word<Tile>(lane, wm * Tile::WM + mt * kMmaM, ks);
          phase_ways(words, 0);
        }
        for (int p = 0; p < Tile::NT / 2; ++p) {
          for (int lane = 0; lane < 32; ++lane)
            words[lane] = b_ldsm_word<Tile>(lane, wn * Tile::WN + p * 2 * kMmaN, ks);
          phase_ways(words, Tile::BM * Tile::BKW);
        }
      }
    }
    return worst;
  };
  return tile == 1 ? ways(LargeTile<4>{}) : ways(SmallTile<4>{});
}

// Emulated fused sign + pack of a tensor with sizes (N, C, H, W) and element strides;
// dtype 0 float32, 1 float16, 2 bfloat16 (the 16-bit types as raw bits, the rule the GPU runs).
int bnas_emu_pack(const void* x, int64_t x_elems, const int64_t* sizes, const int64_t* strides, int groups, int dtype,
                  uint32_t* out, int64_t out_words, char* err, int errlen) {
  PackArgs p;
  if (const char* e = pack_args_init(p, (int)sizes[0], (int)sizes[1], (int)sizes[2], (int)sizes[3], groups)) {
    emu::set_error(err, errlen, e);
    return 1;
  }
  if (out_words != p.total) {
    emu::set_error(err, errlen, "pack: output size does not match");
    return 1;
  }
  if (dtype < 0 || dtype > 2) {
    emu::set_error(err, errlen, "pack: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
    return 1;
  }
  const int64_t elem_bytes = dtype == 0 ? 4 : 2;
  p.x = x; p.sn = strides[0]; p.sc = strides[1]; p.sh = strides[2]; p.sw = strides[3]; p.out = out;
  emu::PlainCtx ctx;
  ctx.spans = {emu::span_of(x, x_elems * elem_bytes, false), emu::span_of(out, out_words * 4, true)};
  try {
    for (int64_t i = 0; i < p.total; ++i) {
      if (dtype == 0) pack_signs_word<float>(p, i, ctx);
      else if (dtype == 1) pack_signs_word<emu::HostHalf>(p, i, ctx);
      else pack_signs_word<emu::HostBf16>(p, i, ctx);
    }
  } catch (const emu::EmuError& e) {
    emu::set_error(err, errlen, e.msg);
    return 2;
  }
  return 0;
}

}  // extern "C"
