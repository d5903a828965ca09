// GFLOP/s of the products this project runs, through system libraries: oneDNN's matmul
// (f32, and bf16 inputs with f32 sums and output; weights reordered once into oneDNN's own
// blocked layout, as ours are packed once) and OpenBLAS's sgemm. Built and run by
// tools/bench_libs.sh beside our own kernels on the same shapes; not part of the product.
//
//   g++ -O2 -std=c++17 tools/bench_libs.cpp -ldnnl -lopenblas -o bench_libs
//   OMP_NUM_THREADS=2 ./bench_libs [REPS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cblas.h>
#include <oneapi/dnnl/dnnl.hpp>

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Median seconds of `reps` timed calls after one warm-up call.
template <class F> static double median_time(int reps, F f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; r++) {
    double s = now();
    f();
    t.push_back(now() - s);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Shape {
  const char *name;
  long m, k, n;
};

int main(int argc, char **argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 7;
  const Shape shapes[] = {
      {"encoder 4608", 4096, 576, 4608}, {"encoder 9216", 4096, 576, 9216},
      {"qkv", 2032, 576, 960},           {"o", 2032, 576, 576},
      {"gate_up", 2032, 576, 3072},      {"down", 2032, 1536, 576},
  };
  engine eng(engine::kind::cpu, 0);
  stream st(eng);
  printf("%-13s %-16s %12s %12s %12s %12s\n", "product", "m x k x n", "blas f32", "dnnl f32",
         "dnnl bf16", "bf16+cast");
  for (const Shape &s : shapes) {
    const long m = s.m, k = s.k, n = s.n;
    const double flop = 2.0 * m * k * n;
    std::vector<float> a(m * k), w(k * n), c(m * n);
    for (long i = 0; i < m * k; i++) a[i] = float(i % 13) * 0.1f - 0.6f;
    for (long i = 0; i < k * n; i++) w[i] = float(i % 7) * 0.1f - 0.3f;

    double t_blas = median_time(reps, [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k,
                  w.data(), n, 0.0f, c.data(), n);
    });

    // oneDNN: weights in the layout the primitive picks (reordered once, outside the timing).
    auto run_dnnl = [&](dt in_type, bool cast_src) {
      memory::desc a_any({m, k}, in_type, tag::ab), w_any({k, n}, in_type, tag::any),
          c_md({m, n}, dt::f32, tag::ab);
      matmul::primitive_desc pd(matmul::desc(a_any, w_any, c_md), eng);  // oneDNN 2.x API
      memory a_f32({{m, k}, dt::f32, tag::ab}, eng, a.data());
      memory w_f32({{k, n}, dt::f32, tag::ab}, eng, w.data());
      memory a_mem(pd.src_desc(), eng), w_mem(pd.weights_desc(), eng);
      memory c_mem(c_md, eng, c.data());
      reorder(w_f32, w_mem).execute(st, w_f32, w_mem);
      reorder(a_f32, a_mem).execute(st, a_f32, a_mem);
      st.wait();
      matmul prim(pd);
      reorder src_cast(a_f32, a_mem);
      return median_time(reps, [&] {
        if (cast_src) src_cast.execute(st, a_f32, a_mem);
        prim.execute(st, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, w_mem}, {DNNL_ARG_DST, c_mem}});
        st.wait();
      });
    };
    double t_f32 = run_dnnl(dt::f32, false);
    double t_bf16 = run_dnnl(dt::bf16, false);
    double t_bf16_cast = run_dnnl(dt::bf16, true);
    char dims[32];
    snprintf(dims, sizeof dims, "%ldx%ldx%ld", m, k, n);
    printf("%-13s %-16s %12.0f %12.0f %12.0f %12.0f\n", s.name, dims, flop / t_blas / 1e9,
           flop / t_f32 / 1e9, flop / t_bf16 / 1e9, flop / t_bf16_cast / 1e9);
  }
  printf("GFLOP/s, median of %d; bf16+cast includes rounding the f32 input to bf16 each call, "
         "as our bf16 products do\n",
         reps);
  return 0;
}
