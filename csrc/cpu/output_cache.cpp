// The CPU output cache: large kernel outputs (gradients, gathered tokens, targets) reuse
// memory freed by earlier outputs of the same size, instead of fresh memory from malloc.
//
// Why: PyTorch's CPU allocator hands allocations over ~128 KiB to malloc, which maps fresh
// pages for them and unmaps them on free. Every training step then pays a page fault and
// a zero-fill per 4 KiB page of every large output, several times the cost of writing it
// (docs/design.md, *CPU outputs*). The CUDA caching allocator avoids
// this on GPUs; this cache does the same for the outputs of sslkern's CPU kernels only.
//
// How: an output's storage owns a block (memory from PyTorch's CPU allocator, so profilers
// see it), and the storage's deleter returns the block to a free list instead of freeing it. A block is therefore reused only after
// its storage was destroyed, when no tensor, view, storage object or autograd record can
// refer to it. Requests reuse a free block of exactly their size (training repeats shapes).
// Free blocks are kept up to SSLKERN_CPU_CACHE_MB MiB (default 2048; 0 disables the cache),
// dropping the least recently freed ones first; outputs below 1 MiB bypass the cache.
// sslkern.empty_cpu_cache() frees the free blocks; sslkern.cpu_cache_info() reports.
#include "common.h"

#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>
#include <new>
#include <vector>

#include <pthread.h>

namespace sslkern {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;

// A block: memory from PyTorch's CPU allocator (so the profiler and memory tools see it
// allocated and freed as usual), owned here while no storage holds it.
struct Block {
  at::DataPtr memory;
  size_t nbytes;
};

struct Cache {
  std::mutex mu;
  std::deque<Block*> free;  // least recently freed first
  size_t free_bytes = 0;
  size_t limit = 0;
  bool limit_read = false;
  int64_t hits = 0, misses = 0;

  size_t limit_locked() {
    if (!limit_read) {
      const char* env = std::getenv("SSLKERN_CPU_CACHE_MB");
      const long long mb = env && *env ? std::atoll(env) : 2048;
      limit = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
      limit_read = true;
    }
    return limit;
  }
  // Takes free blocks, oldest first, until free_bytes + extra fits the limit; they are
  // deleted by the caller outside the lock.
  std::vector<Block*> trim_locked(size_t extra) {
    std::vector<Block*> out;
    while (!free.empty() && free_bytes + extra > limit_locked()) {
      out.push_back(free.front());
      free_bytes -= free.front()->nbytes;
      free.pop_front();
    }
    return out;
  }
};

Cache* g_cache = new Cache();  // never destroyed: deleters may run during interpreter exit

void delete_blocks(const std::vector<Block*>& blocks) {
  for (Block* b : blocks) delete b;  // the DataPtr returns the memory to the allocator
}

// The deleter of an output's storage: the block goes back on the free list.
void return_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  std::vector<Block*> drop;
  {
    std::lock_guard<std::mutex> lock(g_cache->mu);
    if (g_cache->limit_locked() >= b->nbytes) {
      drop = g_cache->trim_locked(b->nbytes);
      g_cache->free.push_back(b);
      g_cache->free_bytes += b->nbytes;
    } else {
      drop.push_back(b);
    }
  }
  delete_blocks(drop);
}

void after_fork_in_child() { new (&g_cache->mu) std::mutex(); }  // a fork may copy a held lock
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, after_fork_in_child);

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_output: CPU only");
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (nbytes < kMinBytes) return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));

  Block* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_cache->mu);
    if (g_cache->limit_locked() == 0) {
      ++g_cache->misses;
    } else {
      auto& fl = g_cache->free;
      // the most recently freed block of this size (warmest in cache)
      for (auto it = fl.rbegin(); it != fl.rend(); ++it) {
        if ((*it)->nbytes == nbytes) {
          block = *it;
          g_cache->free_bytes -= nbytes;
          fl.erase(std::next(it).base());
          break;
        }
      }
      ++(block ? g_cache->hits : g_cache->misses);
    }
  }
  if (!block) block = new Block{c10::GetCPUAllocator()->allocate(nbytes), nbytes};
  at::DataPtr data(block->memory.get(), block, &return_block, at::Device(at::kCPU));
  // resizable like at::empty's storages: a resize allocates from the CPU allocator and the
  // old block comes back here through its deleter
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                    options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

// Python-facing controls (bound in module.cpp).
void output_cache_clear() {
  std::vector<Block*> drop;
  {
    std::lock_guard<std::mutex> lock(g_cache->mu);
    drop.assign(g_cache->free.begin(), g_cache->free.end());
    g_cache->free.clear();
    g_cache->free_bytes = 0;
  }
  delete_blocks(drop);
}

void output_cache_set_limit(int64_t bytes) {
  std::vector<Block*> drop;
  {
    std::lock_guard<std::mutex> lock(g_cache->mu);
    g_cache->limit = bytes > 0 ? static_cast<size_t>(bytes) : 0;
    g_cache->limit_read = true;
    drop = g_cache->trim_locked(0);
  }
  delete_blocks(drop);
}

std::vector<int64_t> output_cache_info() {
  std::lock_guard<std::mutex> lock(g_cache->mu);
  return {static_cast<int64_t>(g_cache->limit_locked()), static_cast<int64_t>(g_cache->free.size()),
          static_cast<int64_t>(g_cache->free_bytes), g_cache->hits, g_cache->misses};
}

}  // namespace sslkern
