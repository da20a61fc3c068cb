// kvsim.cpp: a deterministic SIMT simulator for the kernels of cuda/ (see kvsim.h, docs/cuda.md).
//
// A launch runs its blocks one after another on the calling host thread. The threads of a
// block are fibers (own stacks, cooperative switching), run round-robin in thread order until
// each finishes or stops at a barrier or a warp intrinsic:
//
// - `__syncthreads` releases when every thread of the block waits at the same barrier;
// - a warp intrinsic completes when every lane of its mask waits at the same call with the
//   same mask; the values are exchanged then;
// - no runnable thread and some not finished is a deadlock on a device: the launch fails and
//   says which thread waits where and what the thread it waits for did (divergence).
//
// Memory: the kernel translation units are compiled with -fsanitize=thread and the hooks the
// compiler calls before every load and store (__tsan_read4, ...) are defined here. An access
// must be on the thread's own stack (locals), inside a buffer of the launch (writes only to
// output buffers; naturally aligned; a word of an output that one block wrote is not touched
// by another), or in the host thread's TLS block, where `__shared__` variables live
// (kvsim.h); shared words are checked for races between barriers and for reads of words no
// thread of the block wrote. Any other access fails the launch before it happens. This file
// is compiled without instrumentation.

#include "kvsim.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__) && !defined(KVSIM_UCONTEXT)
#define KVSIM_UCONTEXT 1
#endif
#ifdef KVSIM_UCONTEXT
#include <ucontext.h>
#endif

// ------------------------------------------------------------------ the host interface

extern "C" {
// One kernel argument from the host (src/cuda/sim.rs): a buffer (index into the buffer list,
// -1 for a null pointer), or a 32-bit scalar in `bits`.
struct KvsimArg {
    uint32_t kind;  // kvsim::ParamKind
    int32_t buf;
    uint64_t bits;
};
struct KvsimBuf {
    unsigned char* ptr;
    uint64_t len;
    uint32_t writable;
};
}

namespace kvsim {

using EntriesFn = const Entry* (*)(std::size_t*);
extern const EntriesFn stems[];  // written by build.rs: one function per compiled source

namespace {

constexpr std::size_t kStack = 256 * 1024;  // per simulated thread
constexpr std::size_t kGuard = 4096;
constexpr int kMaxParams = 64;

enum State { RUNNABLE, WAIT_BARRIER, WAIT_WARP, DONE };

struct Wait {
    Site site;
    WarpOp op;
    unsigned mask;
    uint64_t bits;
    int arg, width;
    uint64_t result;
};

struct Fiber {
    unsigned char* mem = nullptr;  // guard page + stack
    uintptr_t lo = 0, hi = 0;      // usable stack
    void* sp = nullptr;
#ifdef KVSIM_UCONTEXT
    ucontext_t uc;
#endif
    State state = DONE;
    Wait w{};
    uint3 tid{};
    unsigned linear = 0;
};

struct Buf {
    uintptr_t lo, hi;
    int param;
    bool writable;
    // Output buffers: per byte, 1 + the linear index of the block that wrote it in this
    // launch (0: none), allocated at the first write.
    std::vector<uint32_t> owner;
};

// Shadow of one byte of shared memory: who touched it since the last barrier (`epoch`), and
// whether a thread of the current block (`block`) wrote it.
struct Shadow {
    uint32_t epoch = 0, block = 0;
    int32_t writer = -1, reader = -1, atomic = -1;  // thread, -1 nobody, -2 several
};

struct Launch {
    const Entry* e = nullptr;
    uint3 grid{}, block{}, bid{};
    unsigned nthreads = 0;
    std::vector<Buf> bufs;
    uint64_t params[kMaxParams] = {};
    int nparams = 0;
    uint32_t block_id = 0;  // 1 + linear index of the running block
    bool failed = false;
    std::string err;
    Site barrier_site{"", 0};  // of the last released barrier
};

struct Sim {
    std::vector<Fiber*> fibers;
    Fiber* cur = nullptr;  // the running fiber, or the last one that ran
    bool in_fiber = false;
    void* sched_sp = nullptr;
#ifdef KVSIM_UCONTEXT
    ucontext_t sched_uc;
#endif
    Launch* L = nullptr;
    std::vector<unsigned> warp_waiting;  // per warp: lanes waiting at a warp intrinsic or exited
    uintptr_t sh_lo = 0, sh_size = 0;
    std::vector<Shadow> shadow;
    uint32_t epoch = 0, block_gen = 0;
};

__attribute__((tls_model("initial-exec"))) thread_local Sim* tls = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local char tls_marker;

// ------------------------------------------------------------------ context switching

#ifndef KVSIM_UCONTEXT
extern "C" void kvsim_switch(void** save_sp, void* to_sp);
extern "C" void kvsim_start();
// Saves the callee-saved registers, mxcsr and the x87 control word on the current stack,
// stores the stack pointer in *save_sp and resumes the context saved at to_sp. A new fiber's
// stack is laid out so that the switch "returns" into kvsim_start, which calls r13(r12).
asm(R"(
    .pushsection .text
    .p2align 4
    .type kvsim_switch,@function
kvsim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kvsim_switch, .-kvsim_switch
    .p2align 4
    .type kvsim_start,@function
kvsim_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size kvsim_start, .-kvsim_start
    .popsection
)");
#endif

void fiber_main(Fiber* f);

#ifdef KVSIM_UCONTEXT
void uc_entry(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
#endif

void fiber_init(Sim& s, Fiber& f) {
    f.state = RUNNABLE;
#ifdef KVSIM_UCONTEXT
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = reinterpret_cast<void*>(f.lo);
    f.uc.uc_stack.ss_size = f.hi - f.lo;
    f.uc.uc_link = &s.sched_uc;
    const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.uc, (void (*)())uc_entry, 2, (unsigned)(p >> 32), (unsigned)p);
#else
    (void)s;
    uint64_t* x = reinterpret_cast<uint64_t*>((f.hi & ~uintptr_t(15)) - 16);  // 16-aligned
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    x[-1] = reinterpret_cast<uint64_t>(&kvsim_start);   // ret
    x[-2] = 0;                                           // rbp
    x[-3] = 0;                                           // rbx
    x[-4] = reinterpret_cast<uint64_t>(&f);              // r12: argument
    x[-5] = reinterpret_cast<uint64_t>(&fiber_main);     // r13: entry
    x[-6] = 0;                                           // r14
    x[-7] = 0;                                           // r15
    x[-8] = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffffu) << 32);
    f.sp = x - 8;
#endif
}

void to_fiber(Sim& s, Fiber& f) {
    s.cur = &f;
    s.in_fiber = true;
#ifdef KVSIM_UCONTEXT
    swapcontext(&s.sched_uc, &f.uc);
#else
    kvsim_switch(&s.sched_sp, f.sp);
#endif
    s.in_fiber = false;
}

void to_scheduler(Sim& s) {
    Fiber& f = *s.cur;
#ifdef KVSIM_UCONTEXT
    swapcontext(&f.uc, &s.sched_uc);
#else
    kvsim_switch(&f.sp, s.sched_sp);
#endif
}

// ------------------------------------------------------------------ reporting

std::string coords(uint3 v) {
    char b[64];
    std::snprintf(b, sizeof b, "(%u,%u,%u)", v.x, v.y, v.z);
    return b;
}

std::string where(const Site& s) { return std::string(s.file) + ":" + std::to_string(s.line); }

const char* op_name(WarpOp op) {
    switch (op) {
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_XOR: return "__shfl_xor_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case BALLOT: return "__ballot_sync";
        case SYNCWARP: return "__syncwarp";
    }
    return "?";
}

// Where the instrumented access at `pc` is: `file+0xoffset`, for `addr2line -Cfpe file 0xoffset`.
std::string code_at(void* pc) {
    Dl_info di;
    char b[64];
    if (pc && dladdr(pc, &di) && di.dli_fname) {
        std::snprintf(b, sizeof b, "+0x%lx", (unsigned long)((uintptr_t)pc - (uintptr_t)di.dli_fbase));
        return std::string(di.dli_fname) + b;
    }
    return "?";
}

// Fails the launch: the message names the kernel, the block and the thread `who` (if any).
// Called from kernel code (in a fiber) it does not return: the fiber is abandoned and the
// scheduler stops the launch.
__attribute__((format(printf, 3, 4))) void fail(Sim& s, const Fiber* who, const char* fmt, ...) {
    Launch& L = *s.L;
    if (!L.failed) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        L.err = "kernel `" + std::string(L.e->name) + "`, block " + coords(L.bid);
        if (who) L.err += ", thread " + coords(who->tid);
        L.err += ": ";
        L.err += msg;
        L.failed = true;
    }
    if (s.in_fiber) {
        to_scheduler(s);
        __builtin_trap();  // never resumed
    }
}

std::string describe(const Fiber& g) {
    switch (g.state) {
        case DONE: return "exited";
        case WAIT_BARRIER: return "waits at __syncthreads (" + where(g.w.site) + ")";
        case WAIT_WARP: {
            char m[32];
            std::snprintf(m, sizeof m, "0x%08x", g.w.mask);
            return std::string("waits at ") + op_name(g.w.op) + " (" + where(g.w.site) + ", mask " + m + ")";
        }
        case RUNNABLE: return "runs";
    }
    return "?";
}

// ------------------------------------------------------------------ memory checks

void shared_access(Sim& s, uintptr_t a, std::size_t n, int kind, void* pc) {
    // kind: 0 read, 1 write, 2 atomic
    const int32_t t = (int32_t)s.cur->linear;
    for (uintptr_t w = a; w < a + n; ++w) {
        Shadow& sh = s.shadow[w - s.sh_lo];
        if (sh.epoch != s.epoch) {
            sh.epoch = s.epoch;
            sh.writer = sh.reader = sh.atomic = -1;
        }
        auto other = [t](int32_t who) { return who != -1 && who != t; };
        const char* what = nullptr;
        int32_t them = -1;
        if (kind == 0) {
            if (sh.block != s.block_gen)
                fail(s, s.cur, "reads shared memory that no thread of this block has written (byte %#lx, code %s)",
                     (unsigned long)w, code_at(pc).c_str());
            if (other(sh.writer)) { what = "reads shared memory that another thread wrote"; them = sh.writer; }
            else if (other(sh.atomic)) { what = "reads shared memory that another thread updated atomically"; them = sh.atomic; }
            sh.reader = sh.reader == -1 || sh.reader == t ? t : -2;
        } else {
            if (other(sh.writer)) { what = "writes shared memory that another thread wrote"; them = sh.writer; }
            else if (other(sh.reader)) { what = "writes shared memory that another thread read"; them = sh.reader; }
            else if (kind == 1 && other(sh.atomic)) { what = "writes shared memory that another thread updated atomically"; them = sh.atomic; }
            if (kind == 1) sh.writer = t;
            else sh.atomic = sh.atomic == -1 || sh.atomic == t ? t : -2;
            sh.block = s.block_gen;
        }
        if (what) {
            std::string who = them >= 0 ? "thread " + coords(s.fibers[them]->tid) : std::string("several threads");
            fail(s, s.cur, "shared-memory race: %s (%s) since the last barrier (%s; byte %#lx, code %s)", what,
                 who.c_str(), s.L->barrier_site.line ? where(s.L->barrier_site).c_str() : "block start",
                 (unsigned long)w, code_at(pc).c_str());
        }
    }
}

// Blocks run in any order on a device: a word of an output written by one block must not be
// written or read by another block of the same launch (atomics excepted).
void global_order(Sim& s, Buf& b, uintptr_t a, std::size_t n, int kind, void* pc) {
    const Launch& L = *s.L;
    if (b.owner.empty()) {
        if (kind == 0) return;  // nothing written yet
        b.owner.assign(b.hi - b.lo, 0);
    }
    for (uintptr_t i = a - b.lo; i < a + n - b.lo; ++i) {
        const uint32_t o = b.owner[i];
        if (o && o != L.block_id) {
            const uint32_t other = o - 1, gx = L.grid.x, gy = L.grid.y;
            const uint3 ob{other % gx, (other / gx) % gy, other / (gx * gy)};
            fail(s, s.cur,
                 "%s byte %lu of parameter %d, which block %s wrote in this launch (blocks run in any order; code %s)",
                 kind == 0 ? "reads" : "writes", (unsigned long)i, b.param, coords(ob).c_str(), code_at(pc).c_str());
        }
        if (kind == 1) b.owner[i] = L.block_id;
    }
}

inline void access(void* p, std::size_t n, int kind, bool aligned, void* pc) {
    Sim* s = tls;
    if (!s || !s->in_fiber) return;  // not kernel code running in a fiber
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const Fiber& f = *s->cur;
    if (a - f.lo < f.hi - f.lo && a + n <= f.hi) return;  // a local of this thread
    if (aligned && n > 1 && (a & (n - 1)))
        fail(*s, s->cur, "misaligned %zu-byte access at %#lx (code %s)", n, (unsigned long)a, code_at(pc).c_str());
    Launch& L = *s->L;
    for (Buf& b : L.bufs) {
        if (a >= b.lo && a + n <= b.hi) {
            if (kind != 0 && !b.writable)
                fail(*s, s->cur, "writes to parameter %d, a read-only input buffer (byte %lu of %lu; code %s)", b.param,
                     (unsigned long)(a - b.lo), (unsigned long)(b.hi - b.lo), code_at(pc).c_str());
            if (b.writable && kind != 2) global_order(*s, b, a, n, kind, pc);
            return;
        }
    }
    if (a - s->sh_lo < s->sh_size) {
        shared_access(*s, a, n, kind, pc);
        return;
    }
    // Out of bounds: name the nearest buffer.
    const Buf* best = nullptr;
    uintptr_t dist = ~uintptr_t(0);
    for (const Buf& b : L.bufs) {
        const uintptr_t d = a < b.lo ? b.lo - a : a + n > b.hi ? a + n - b.hi : 0;
        if (d < dist) { dist = d; best = &b; }
    }
    const char* verb = kind == 0 ? "reads" : "writes";
    if (best && dist < (uintptr_t(1) << 26))
        fail(*s, s->cur, "out-of-bounds access: %s %zu bytes at byte %ld of parameter %d, a buffer of %lu bytes (code %s)",
             verb, n, (long)(a - best->lo), best->param, (unsigned long)(best->hi - best->lo), code_at(pc).c_str());
    fail(*s, s->cur, "out-of-bounds access: %s %zu bytes at %#lx, outside every buffer of the launch (code %s)", verb, n,
         (unsigned long)a, code_at(pc).c_str());
}

// The TLS block of the module holding this file (where `__shared__` variables live), as a
// window around a TLS variable of this file: [marker - span, marker + span).
struct TlsInfo {
    uintptr_t code;
    std::size_t memsz = 0, align = 1;
};
int find_tls(struct dl_phdr_info* info, std::size_t, void* data) {
    TlsInfo* t = static_cast<TlsInfo*>(data);
    bool mine = false;
    std::size_t memsz = 0, align = 1;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD) {
            const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
            if (t->code >= lo && t->code < lo + ph.p_memsz) mine = true;
        } else if (ph.p_type == PT_TLS) {
            memsz = ph.p_memsz;
            align = ph.p_align ? ph.p_align : 1;
        }
    }
    if (mine) {
        t->memsz = memsz;
        t->align = align;
        return 1;
    }
    return 0;
}

// Frees a host thread's simulator (fiber stacks, shadow memory) when the thread exits.
struct SimOwner {
    Sim* s = nullptr;
    ~SimOwner() {
        if (!s) return;
        for (Fiber* f : s->fibers) {
            munmap(f->mem, kGuard + kStack);
            delete f;
        }
        delete s;
        tls = nullptr;
    }
};
thread_local SimOwner owner;

Sim& sim() {
    if (tls) return *tls;
    Sim* s = new Sim();  // one per host thread that launches; freed when the thread exits
    owner.s = s;
    TlsInfo t;
    t.code = reinterpret_cast<uintptr_t>(&find_tls);
    dl_iterate_phdr(find_tls, &t);
    const std::size_t span = t.memsz + 2 * t.align + 64;
    s->sh_lo = reinterpret_cast<uintptr_t>(&tls_marker) - span;
    s->sh_size = 2 * span;
    s->shadow.resize(s->sh_size + 16);
    tls = s;
    return *s;
}

// ------------------------------------------------------------------ warp intrinsics

inline unsigned popc(unsigned x) {  // without -mpopcnt, __builtin_popcount is a libgcc call
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    return (((x + (x >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24;
}

// Completes the intrinsic that thread `t` just reached if every lane of its mask is there.
void try_warp(Sim& s, unsigned t) {
    Launch& L = *s.L;
    Fiber& f = *s.fibers[t];
    const unsigned base = t & ~31u, lane = t & 31u;
    const unsigned lanes = std::min(32u, L.nthreads - base);
    const Wait& w = f.w;
    // Fewer lanes waiting (or exited) in this warp than the mask names: nothing to decide yet.
    if (s.warp_waiting[t >> 5] < popc(w.mask) && ((w.mask >> lane) & 1u) &&
        !(lanes < 32 && (w.mask >> lanes)))
        return;
    if (w.width < 1 || w.width > 32 || (w.width & (w.width - 1)))
        fail(s, &f, "%s (%s) with width %d (must be a power of two up to 32)", op_name(w.op), where(w.site).c_str(), w.width);
    if (!((w.mask >> lane) & 1u))
        fail(s, &f, "%s (%s) with mask 0x%08x, which leaves out the calling lane %u", op_name(w.op), where(w.site).c_str(),
             w.mask, lane);
    if (lanes < 32 && (w.mask >> lanes))
        fail(s, &f, "%s (%s) with mask 0x%08x in a partial warp of %u lanes (block of %u threads)", op_name(w.op),
             where(w.site).c_str(), w.mask, lanes, L.nthreads);
    for (unsigned l = 0; l < 32; ++l) {
        if (!((w.mask >> l) & 1u)) continue;
        const Fiber& g = *s.fibers[base + l];
        if (g.state == DONE)
            fail(s, &f, "warp divergence: %s (%s, mask 0x%08x) waits for lane %u, thread %s, which exited", op_name(w.op),
                 where(w.site).c_str(), w.mask, l, coords(g.tid).c_str());
        if (g.state != WAIT_WARP || g.w.op != w.op || g.w.mask != w.mask || g.w.site.line != w.site.line ||
            g.w.site.file != w.site.file || g.w.width != w.width)
            return;  // not there yet (a mismatch that never resolves is reported as a deadlock)
    }
    uint64_t ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((w.mask >> l) & 1u) && s.fibers[base + l]->w.bits) ballot |= 1ull << l;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((w.mask >> l) & 1u)) continue;
        Fiber& g = *s.fibers[base + l];
        const int wd = w.width, seg = (int)l & ~(wd - 1);
        int src = (int)l;
        switch (w.op) {
            case SHFL_IDX: src = seg + (g.w.arg & (wd - 1)); break;
            case SHFL_XOR: src = (int)l ^ g.w.arg; if (src >= seg + wd) src = (int)l; break;
            case SHFL_DOWN: src = (int)l + g.w.arg; if (src >= seg + wd) src = (int)l; break;
            case SHFL_UP: src = (int)l - g.w.arg; if (src < seg) src = (int)l; break;
            case BALLOT: case SYNCWARP: break;
        }
        if (w.op == BALLOT || w.op == SYNCWARP) {
            g.w.result = ballot;
        } else {
            if (src < 0 || src > 31 || !((w.mask >> src) & 1u)) {
                fail(s, &g, "%s (%s, mask 0x%08x) reads lane %d, which is not in the mask (undefined value)",
                     op_name(w.op), where(w.site).c_str(), w.mask, src);
            }
            g.w.result = s.fibers[base + src]->w.bits;
        }
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((w.mask >> l) & 1u) s.fibers[base + l]->state = RUNNABLE;
    s.warp_waiting[t >> 5] -= popc(w.mask);
}

// ------------------------------------------------------------------ blocks and launches

void fiber_main(Fiber* f) {
    Sim& s = *tls;
    Launch& L = *s.L;
    // The parameter values on this thread's own stack: the thunk reads them as locals.
    uint64_t pv[kMaxParams];
    void* ptrs[kMaxParams];
    for (int i = 0; i < L.nparams; ++i) {
        pv[i] = L.params[i];
        ptrs[i] = &pv[i];
    }
    L.e->invoke(ptrs);
    f->state = DONE;
    to_scheduler(s);
    __builtin_trap();
}

Fiber* new_fiber() {
    Fiber* f = new Fiber();
    void* m = mmap(nullptr, kGuard + kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    f->mem = static_cast<unsigned char*>(m);
    f->lo = reinterpret_cast<uintptr_t>(m) + kGuard;
    f->hi = f->lo + kStack;
    return f;
}

void diagnose_deadlock(Sim& s) {
    const Launch& L = *s.L;
    for (unsigned t = 0; t < L.nthreads; ++t) {
        const Fiber& f = *s.fibers[t];
        if (f.state != WAIT_WARP) continue;
        const unsigned base = t & ~31u;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((f.w.mask >> l) & 1u)) continue;
            const Fiber& g = *s.fibers[base + l];
            const bool same = g.state == WAIT_WARP && g.w.op == f.w.op && g.w.mask == f.w.mask &&
                              g.w.site.line == f.w.site.line && g.w.site.file == f.w.site.file;
            if (!same) {
                fail(s, &f, "warp divergence: it %s, but lane %u of its mask (thread %s) %s", describe(f).c_str(), l,
                     coords(g.tid).c_str(), describe(g).c_str());
                return;
            }
        }
    }
    // Barrier: every thread left waits at one; some exited (or wait elsewhere).
    unsigned at = 0, first = L.nthreads, gone = L.nthreads;
    for (unsigned t = 0; t < L.nthreads; ++t) {
        const Fiber& f = *s.fibers[t];
        if (f.state == WAIT_BARRIER) { ++at; if (first == L.nthreads) first = t; }
        else if (gone == L.nthreads) gone = t;
    }
    if (first < L.nthreads && gone < L.nthreads) {
        fail(s, s.fibers[first], "barrier reached by part of the block: %u of %u threads wait at __syncthreads (%s); thread %s %s", at,
             L.nthreads, where(s.fibers[first]->w.site).c_str(), coords(s.fibers[gone]->tid).c_str(),
             describe(*s.fibers[gone]).c_str());
        return;
    }
    fail(s, nullptr, "deadlock: no thread can make progress");
}

void release_barrier(Sim& s) {
    Launch& L = *s.L;
    const Site site = s.fibers[0]->w.site;
    for (unsigned t = 1; t < L.nthreads; ++t) {
        const Site& o = s.fibers[t]->w.site;
        if (o.line != site.line || o.file != site.file) {
            fail(s, s.fibers[t], "threads wait at different barriers: thread %s at __syncthreads (%s), thread %s at __syncthreads (%s)",
                 coords(s.fibers[0]->tid).c_str(), where(site).c_str(), coords(s.fibers[t]->tid).c_str(),
                 where(o).c_str());
            return;
        }
    }
    ++s.epoch;
    L.barrier_site = site;
    for (unsigned t = 0; t < L.nthreads; ++t) s.fibers[t]->state = RUNNABLE;
}

void run_block(Sim& s) {
    Launch& L = *s.L;
    ++s.epoch;
    ++s.block_gen;
    L.barrier_site = Site{"", 0};
    for (unsigned t = 0; t < L.nthreads; ++t) fiber_init(s, *s.fibers[t]);
    s.warp_waiting.assign((L.nthreads + 31) / 32, 0);
    unsigned done = 0, at_barrier = 0;
    for (;;) {
        bool progress = false;
        for (unsigned t = 0; t < L.nthreads; ++t) {
            Fiber& f = *s.fibers[t];
            if (f.state != RUNNABLE) continue;
            progress = true;
            to_fiber(s, f);
            if (L.failed) return;
            if (f.state == DONE) {
                ++done;
                ++s.warp_waiting[t >> 5];
            } else if (f.state == WAIT_WARP) {
                ++s.warp_waiting[t >> 5];
                try_warp(s, t);
                if (L.failed) return;
            } else if (f.state == WAIT_BARRIER && ++at_barrier == L.nthreads) {
                at_barrier = 0;
                release_barrier(s);
                if (L.failed) return;
            }
        }
        if (done == L.nthreads) return;
        if (!progress) {
            diagnose_deadlock(s);
            return;
        }
    }
}

std::once_flag registry_once;
std::unordered_map<std::string, const Entry*>* registry;
std::vector<const Entry*>* entry_list;

void build_registry() {
    registry = new std::unordered_map<std::string, const Entry*>();
    entry_list = new std::vector<const Entry*>();
    for (const EntriesFn* fn = stems; *fn; ++fn) {
        std::size_t n = 0;
        const Entry* e = (*fn)(&n);
        for (std::size_t i = 0; i < n; ++i) {
            (*registry)[e[i].name] = &e[i];
            entry_list->push_back(&e[i]);
        }
    }
}

const char* kind_name(int k) { return k == PARAM_PTR ? "a pointer" : k == PARAM_U32 ? "a 32-bit integer" : "a float"; }

}  // namespace

// ------------------------------------------------------------------ calls from kernel code

uint3 thread_idx() { return tls->cur->tid; }
uint3 block_idx() { return tls->L->bid; }
uint3 block_dim() { return tls->L->block; }
uint3 grid_dim() { return tls->L->grid; }

void syncthreads(Site site) {
    Sim& s = *tls;
    s.cur->w.site = site;
    s.cur->state = WAIT_BARRIER;
    to_scheduler(s);
}

uint64_t warp_op(Site site, WarpOp op, unsigned mask, uint64_t bits, int arg, int width) {
    Sim& s = *tls;
    Fiber& f = *s.cur;
    f.w.site = site;
    f.w.op = op;
    f.w.mask = mask;
    f.w.bits = bits;
    f.w.arg = arg;
    f.w.width = width;
    f.state = WAIT_WARP;
    to_scheduler(s);
    return f.w.result;
}

unsigned atomic_op(AtomicOp op, void* addr, unsigned v, unsigned cmp) {
    access(addr, 4, 2, true, __builtin_return_address(0));
    unsigned* p = static_cast<unsigned*>(addr);
    const unsigned old = *p;
    switch (op) {
        case ATOMIC_ADD_U32: *p = old + v; break;
        case ATOMIC_ADD_F32: *p = f32_bits(bits_f32(old) + bits_f32(v)); break;
        case ATOMIC_MAX_U32: *p = old > v ? old : v; break;
        case ATOMIC_CAS_U32: if (old == cmp) *p = v; break;
        case ATOMIC_OR_U32: *p = old | v; break;
    }
    return old;
}

void check_aligned(Site site, const void* p, unsigned align) {
    if (reinterpret_cast<uintptr_t>(p) % align)
        fail(*tls, tls->cur, "misaligned %u-byte vector access at %p (%s)", align, p, where(site).c_str());
}

}  // namespace kvsim

// ------------------------------------------------------------------ the sanitizer hooks

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define KVSIM_HOOKS(N)                                                                                            \
    void __tsan_read##N(void* p) { kvsim::access(p, N, 0, true, __builtin_return_address(0)); }                  \
    void __tsan_write##N(void* p) { kvsim::access(p, N, 1, true, __builtin_return_address(0)); }                 \
    void __tsan_unaligned_read##N(void* p) { kvsim::access(p, N, 0, false, __builtin_return_address(0)); }       \
    void __tsan_unaligned_write##N(void* p) { kvsim::access(p, N, 1, false, __builtin_return_address(0)); }
KVSIM_HOOKS(1)
KVSIM_HOOKS(2)
KVSIM_HOOKS(4)
KVSIM_HOOKS(8)
KVSIM_HOOKS(16)
void __tsan_read_range(void* p, std::size_t n) { kvsim::access(p, n, 0, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, std::size_t n) { kvsim::access(p, n, 1, false, __builtin_return_address(0)); }
void* __tsan_memcpy(void* d, const void* s, std::size_t n) {
    kvsim::access(const_cast<void*>(s), n, 0, false, __builtin_return_address(0));
    kvsim::access(d, n, 1, false, __builtin_return_address(0));
    return std::memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, std::size_t n) {
    kvsim::access(const_cast<void*>(s), n, 0, false, __builtin_return_address(0));
    kvsim::access(d, n, 1, false, __builtin_return_address(0));
    return std::memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, std::size_t n) {
    kvsim::access(d, n, 1, false, __builtin_return_address(0));
    return std::memset(d, c, n);
}

// ------------------------------------------------------------------ the host entry points

std::size_t kvsim_kernel_count() {
    std::call_once(kvsim::registry_once, kvsim::build_registry);
    return kvsim::entry_list->size();
}

const char* kvsim_kernel_name(std::size_t i) {
    std::call_once(kvsim::registry_once, kvsim::build_registry);
    return i < kvsim::entry_list->size() ? (*kvsim::entry_list)[i]->name : nullptr;
}

// Runs kernel `name` over `grid` blocks of `block` threads. Returns 0, or 1 with a message
// in `err` (NUL-terminated, truncated to `err_cap`).
int kvsim_launch(const char* name, const uint32_t* grid, const uint32_t* block, const KvsimArg* args,
                 std::size_t nargs, const KvsimBuf* bufs, std::size_t nbufs, char* err, std::size_t err_cap) {
    using namespace kvsim;
    std::call_once(registry_once, build_registry);
    auto put = [&](const std::string& m) {
        std::snprintf(err, err_cap, "%s", m.c_str());
        return 1;
    };
    auto it = registry->find(name);
    if (it == registry->end()) return put(std::string("no kernel named `") + name + "` in the simulator build");
    const Entry* e = it->second;
    Sim& s = sim();
    if (s.L) return put("a kernel launched from inside a kernel");
    Launch L;
    L.e = e;
    L.grid = uint3{grid[0], grid[1], grid[2]};
    L.block = uint3{block[0], block[1], block[2]};
    L.nthreads = block[0] * block[1] * block[2];
    std::string pre = std::string("kernel `") + name + "`: ";
    if (!block[0] || !block[1] || !block[2] || L.nthreads > 1024 || block[2] > 64)
        return put(pre + "invalid block " + coords(L.block) + " (at most 1024 threads, z at most 64)");
    if (e->max_threads && L.nthreads > e->max_threads)
        return put(pre + "block of " + std::to_string(L.nthreads) + " threads above its __launch_bounds__(" +
                   std::to_string(e->max_threads) + ")");
    if (!grid[0] || !grid[1] || !grid[2] || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
        return put(pre + "invalid grid " + coords(L.grid) + " (y and z at most 65535)");
    if ((int)nargs != e->n_params)
        return put(pre + "the host passes " + std::to_string(nargs) + " arguments, the kernel takes " +
                   std::to_string(e->n_params));
    L.nparams = (int)nargs;
    for (std::size_t i = 0; i < nargs; ++i) {
        const KvsimArg& a = args[i];
        if ((int)a.kind != e->kinds[i])
            return put(pre + "argument " + std::to_string(i) + ": the host passes " + kind_name((int)a.kind) +
                       ", the kernel takes " + kind_name(e->kinds[i]));
        if (a.kind == PARAM_PTR) {
            if (a.buf >= 0 && (std::size_t)a.buf < nbufs) {
                L.params[i] = reinterpret_cast<uint64_t>(bufs[a.buf].ptr);
                const uintptr_t lo = reinterpret_cast<uintptr_t>(bufs[a.buf].ptr);
                L.bufs.push_back(Buf{lo, lo + bufs[a.buf].len, (int)i, bufs[a.buf].writable != 0, {}});
            } else {
                L.params[i] = 0;
            }
        } else {
            L.params[i] = a.bits;
        }
    }
    while (s.fibers.size() < L.nthreads) {
        Fiber* f = new_fiber();
        if (!f) return put("could not map a fiber stack");
        s.fibers.push_back(f);
    }
    for (unsigned t = 0; t < L.nthreads; ++t) {
        Fiber& f = *s.fibers[t];
        f.linear = t;
        f.tid = uint3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
    }
    s.L = &L;
    for (unsigned z = 0; z < grid[2] && !L.failed; ++z)
        for (unsigned y = 0; y < grid[1] && !L.failed; ++y)
            for (unsigned x = 0; x < grid[0] && !L.failed; ++x) {
                L.bid = uint3{x, y, z};
                L.block_id = 1 + x + grid[0] * (y + grid[1] * z);
                run_block(s);
            }
    s.L = nullptr;
    s.cur = nullptr;
    if (L.failed) return put(L.err);
    return 0;
}
}
