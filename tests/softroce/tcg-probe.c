// What copies and vector arithmetic cost under emulation, against the host: run it on both.
// - glibc's memcpy against a plain SSE2 loop, at sizes from a small request to a large push. It
//   backs run.sh's choice of a TCG CPU without ERMS (see the comment at its accelerator): with
//   ERMS glibc copies with `rep movsb`, which TCG runs a byte at a time.
// - 16,384 additions, f32 and i32, as a shard's `sum` of a 64 KiB push does them (vectorized).
// - What a request's path pays beside its arithmetic: a direct call and return, an indirect call
//   (a `dyn` method, a function pointer), a 16-byte memcpy through libc, a clock read
//   (clock_gettime, as Rust's Instant::now), and a 64-bit remainder by a divisor known only at
//   run time (a ring's `seq % slots`), each against a loop of plain arithmetic.
//
//   gcc -O2 -o /tmp/tcg-probe tests/softroce/tcg-probe.c
//   /tmp/tcg-probe                                            # the host
//   tests/softroce/run.sh /tmp/tcg-probe                      # the guest's default CPU, no ERMS
//   SOFTROCE_CPU=max tests/softroce/run.sh /tmp/tcg-probe     # with ERMS
//
// Prints the mean time of one copy (or one pass of additions) each way, three times over.
#include <emmintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

// 64 bytes a pass, unaligned 16-byte loads and stores: what a vector copy loop does.
static void sse2_copy(char *dst, const char *src, size_t n) {
    for (size_t i = 0; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_storeu_si128((__m128i *)(dst + i), a);
        _mm_storeu_si128((__m128i *)(dst + i + 16), b);
        _mm_storeu_si128((__m128i *)(dst + i + 32), c);
        _mm_storeu_si128((__m128i *)(dst + i + 48), d);
    }
}

#define ADDS 16384
static float pf[ADDS], gf[ADDS];
static int32_t pi[ADDS], gi[ADDS];

__attribute__((noinline)) static uint64_t step(uint64_t x) {
    __asm__ volatile("");
    return x * 3 + 1;
}
static uint64_t (*volatile step_ptr)(uint64_t) = step;

// Nanoseconds per iteration of each kind of loop.
static void calls(void) {
    const long n = 5000000;
    uint64_t x = 1;
    char a[64], b[64];
    size_t len = 16;
    memset(a, 1, sizeof a);
    __asm__ volatile("" : "+r"(len));  // a length the compiler cannot see: a real memcpy call
    double t0 = now_us();
    for (long i = 0; i < n; i++) {
        x = x * 3 + 1;
        __asm__ volatile("" : : "r"(x));
    }
    double t1 = now_us();
    for (long i = 0; i < n; i++) x = step(x);
    double t2 = now_us();
    for (long i = 0; i < n; i++) x = step_ptr(x);
    double t3 = now_us();
    for (long i = 0; i < n; i++) {
        memcpy(b, a, len);
        __asm__ volatile("" : : "r"(b) : "memory");
    }
    double t4 = now_us();
    for (long i = 0; i < n / 10; i++) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        x += (uint64_t)t.tv_nsec;
    }
    double t5 = now_us();
    uint64_t slots = 16;
    __asm__ volatile("" : "+r"(slots));  // a divisor the compiler cannot see: a real div
    for (long i = 0; i < n; i++) {
        x = x * 3 + 1 + x % slots;
        __asm__ volatile("" : : "r"(x));
    }
    double t6 = now_us();
    printf("ns per iteration: arithmetic %.2f, direct call %.2f, indirect call %.2f, memcpy(16) %.2f, clock_gettime %.2f, "
           "arithmetic and u64 %% %.2f (%llu)\n",
           (t1 - t0) * 1e3 / n, (t2 - t1) * 1e3 / n, (t3 - t2) * 1e3 / n, (t4 - t3) * 1e3 / n, (t5 - t4) * 1e4 / n,
           (t6 - t5) * 1e3 / n, (unsigned long long)(x & 1));
}

int main(void) {
    static const size_t sizes[] = {64, 4096, 65536, 262144, 1048576};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        char *src = aligned_alloc(4096, n), *dst = aligned_alloc(4096, n);
        if (!src || !dst) return 1;
        memset(src, 1, n);
        memset(dst, 0, n);
        int iters = n <= 4096 ? 20000 : (int)(50000000 / n + 10);
        for (int round = 0; round < 3; round++) {
            double t0 = now_us();
            for (int i = 0; i < iters; i++) {
                memcpy(dst, src, n);
                __asm__ volatile("" : : "r"(dst) : "memory");  // keep every copy
            }
            double t1 = now_us();
            for (int i = 0; i < iters; i++) {
                sse2_copy(dst, src, n);
                __asm__ volatile("" : : "r"(dst) : "memory");
            }
            double t2 = now_us();
            printf("%8zu B: glibc memcpy %9.3f us   sse2 loop %9.3f us\n", n, (t1 - t0) / iters, (t2 - t1) / iters);
        }
        free(src);
        free(dst);
    }
    for (int i = 0; i < ADDS; i++) {
        gf[i] = 1.0f;
        gi[i] = 1;
    }
    for (int round = 0; round < 3; round++) {
        const int iters = 2000;
        double t0 = now_us();
        for (int k = 0; k < iters; k++) {
            for (int i = 0; i < ADDS; i++) pf[i] += gf[i];
            __asm__ volatile("" : : "r"(pf) : "memory");
        }
        double t1 = now_us();
        for (int k = 0; k < iters; k++) {
            for (int i = 0; i < ADDS; i++) pi[i] += gi[i];
            __asm__ volatile("" : : "r"(pi) : "memory");
        }
        double t2 = now_us();
        printf("%d adds: f32 %9.3f us   i32 %9.3f us\n", ADDS, (t1 - t0) / iters, (t2 - t1) / iters);
    }
    for (int round = 0; round < 3; round++) calls();
    return 0;
}
