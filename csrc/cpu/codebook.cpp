// Exact nearest-codeword search on the CPU.
//
// 2-D: the codebook is fixed while millions of points are coded against it, so a uniform
// grid over the codebook's bounding box is built once (and cached by content): each cell
// lists, in ascending index order, every codeword that can be nearest to some point of the
// cell. A query scans only its cell's list (typically a handful of codewords); points
// outside the grid (or NaN) fall back to a scan of all K codewords.
// 1-D: binary search in the sorted codebook.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "kernels.h"

namespace qamw::cpu {
namespace {

struct Grid2d {
  std::vector<float> codebook;  // K * 2, the content this grid was built for
  int64_t K = 0;
  int64_t cells = 0;            // per axis
  float x0 = 0, y0 = 0, inv_dx = 0, inv_dy = 0, x1 = 0, y1 = 0;
  std::vector<int32_t> start;   // cells*cells + 1 offsets into `candidates`
  std::vector<int32_t> candidates;
};

inline float squared_distance(float px, float py, const float* c) {
  const float dx = px - c[0], dy = py - c[1];
  return dx * dx + dy * dy;
}

inline int32_t brute_force(float px, float py, const float* codebook, int64_t K) {
  int32_t best = 0;
  float best_d = std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    const float d = squared_distance(px, py, codebook + 2 * k);
    if (d < best_d) { best_d = d; best = static_cast<int32_t>(k); }
  }
  return best;
}

std::shared_ptr<const Grid2d> build_grid(const float* codebook, int64_t K) {
  auto g = std::make_shared<Grid2d>();
  g->codebook.assign(codebook, codebook + 2 * K);
  g->K = K;
  float xmin = codebook[0], xmax = codebook[0], ymin = codebook[1], ymax = codebook[1];
  for (int64_t k = 1; k < K; ++k) {
    xmin = std::min(xmin, codebook[2 * k]); xmax = std::max(xmax, codebook[2 * k]);
    ymin = std::min(ymin, codebook[2 * k + 1]); ymax = std::max(ymax, codebook[2 * k + 1]);
  }
  // Cover the codebook's box plus a margin of one average spacing; beyond it, brute force.
  const double span = std::max<double>({xmax - xmin, ymax - ymin, 1e-6});
  const int64_t cells = std::clamp<int64_t>(
      static_cast<int64_t>(std::ceil(2.0 * std::sqrt(static_cast<double>(K)))), 1, 192);
  const double margin = span / std::max<int64_t>(1, cells / 2);
  const double lo_x = xmin - margin, lo_y = ymin - margin;
  const double dx = (xmax - xmin + 2 * margin) / cells, dy = (ymax - ymin + 2 * margin) / cells;
  g->cells = cells;
  g->x0 = static_cast<float>(lo_x); g->y0 = static_cast<float>(lo_y);
  g->x1 = static_cast<float>(lo_x + cells * dx); g->y1 = static_cast<float>(lo_y + cells * dy);
  g->inv_dx = static_cast<float>(1.0 / dx); g->inv_dy = static_cast<float>(1.0 / dy);

  // Codeword c can be nearest somewhere in a cell only if its smallest distance to the cell
  // is at most the smallest (over codewords) largest distance to the cell. The bound is
  // widened slightly so that fp32 rounding in the queries can never exclude the winner.
  std::vector<std::vector<int32_t>> lists(cells * cells);
  at::parallel_for(0, cells * cells, 16, [&](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) {
      const double cx0 = lo_x + (cell % cells) * dx, cx1 = cx0 + dx;
      const double cy0 = lo_y + (cell / cells) * dy, cy1 = cy0 + dy;
      double bound = std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        const double px = codebook[2 * k], py = codebook[2 * k + 1];
        const double fx = std::max(std::abs(px - cx0), std::abs(px - cx1));
        const double fy = std::max(std::abs(py - cy0), std::abs(py - cy1));
        bound = std::min(bound, fx * fx + fy * fy);
      }
      bound = bound * (1 + 1e-4) + 1e-9;
      auto& list = lists[cell];
      for (int64_t k = 0; k < K; ++k) {
        const double px = codebook[2 * k], py = codebook[2 * k + 1];
        const double nx = std::max({cx0 - px, 0.0, px - cx1});
        const double ny = std::max({cy0 - py, 0.0, py - cy1});
        if (nx * nx + ny * ny <= bound) list.push_back(static_cast<int32_t>(k));
      }
    }
  });
  g->start.resize(cells * cells + 1, 0);
  for (int64_t c = 0; c < cells * cells; ++c)
    g->start[c + 1] = g->start[c] + static_cast<int32_t>(lists[c].size());
  g->candidates.reserve(g->start.back());
  for (auto& list : lists) g->candidates.insert(g->candidates.end(), list.begin(), list.end());
  return g;
}

// A few recently used grids, looked up by codebook content (exact comparison), so that
// repeated calls with the same codebook pay the build once. Safe from many threads.
std::shared_ptr<const Grid2d> grid_for(const float* codebook, int64_t K) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const Grid2d>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if ((*it)->K == K && std::memcmp((*it)->codebook.data(), codebook, 8 * K) == 0) {
        auto hit = *it;
        cache.erase(it);
        cache.insert(cache.begin(), hit);
        return hit;
      }
    }
  }
  auto grid = build_grid(codebook, K);
  std::lock_guard<std::mutex> lock(mutex);
  cache.insert(cache.begin(), grid);
  if (cache.size() > 8) cache.pop_back();
  return grid;
}

}  // namespace

void nearest_codeword_2d(const float* points, int64_t count, const float* codebook, int64_t K,
                         int32_t* out) {
  if (count == 0) return;
  if (count * 4 < K) {  // too few points to pay for a grid
    at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        out[i] = brute_force(points[2 * i], points[2 * i + 1], codebook, K);
    });
    return;
  }
  const auto grid = grid_for(codebook, K);
  const Grid2d& g = *grid;
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float px = points[2 * i], py = points[2 * i + 1];
      if (!(px >= g.x0 && px < g.x1 && py >= g.y0 && py < g.y1)) {
        out[i] = brute_force(px, py, codebook, K);
        continue;
      }
      const int64_t ix = std::min<int64_t>(static_cast<int64_t>((px - g.x0) * g.inv_dx), g.cells - 1);
      const int64_t iy = std::min<int64_t>(static_cast<int64_t>((py - g.y0) * g.inv_dy), g.cells - 1);
      const int64_t cell = iy * g.cells + ix;
      int32_t best = 0;
      float best_d = std::numeric_limits<float>::infinity();
      for (int32_t c = g.start[cell]; c < g.start[cell + 1]; ++c) {
        const int32_t k = g.candidates[c];
        const float d = squared_distance(px, py, codebook + 2 * k);
        if (d < best_d) { best_d = d; best = k; }
      }
      out[i] = best;
    }
  });
}

void nearest_codeword_1d(const float* values, int64_t count, const float* codebook, int64_t K,
                         int32_t* out) {
  if (count == 0) return;
  // Distinct values in ascending order, each with the lowest index that holds it.
  std::vector<int32_t> order(K);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return codebook[a] < codebook[b]; });
  std::vector<float> sorted;
  std::vector<int32_t> index;
  for (int32_t k : order) {
    if (sorted.empty() || codebook[k] != sorted.back()) {
      sorted.push_back(codebook[k]);
      index.push_back(k);
    }
  }
  const int64_t D = static_cast<int64_t>(sorted.size());
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = values[i];
      // As in the spec (and the CUDA kernel): every distance to a NaN or an infinite value
      // is NaN or inf, so none is smaller than another and the answer is index 0.
      if (!std::isfinite(v)) { out[i] = 0; continue; }
      const int64_t p = std::lower_bound(sorted.begin(), sorted.end(), v) - sorted.begin();
      if (p == 0) { out[i] = index[0]; continue; }
      if (p == D) { out[i] = index[D - 1]; continue; }
      const float below = std::abs(v - sorted[p - 1]), above = std::abs(sorted[p] - v);
      if (below < above) out[i] = index[p - 1];
      else if (above < below) out[i] = index[p];
      else out[i] = std::min(index[p - 1], index[p]);
    }
  });
}

}  // namespace qamw::cpu
