// sdrt's operators for ONNX Runtime's CPU execution provider, as a custom-operator library
// (SessionOptions.register_custom_ops_library). Built on the user's machine by sdrt/runtime/engines/native_ops.py.
//
//   ai.sdrt Attention(q, k, v; num_heads: int, scale: float) -> out                     (attention.h)
//   ai.sdrt GroupNorm(x, gamma, beta; groups: int, epsilon: float) -> out                (group_norm.h)
//   ai.sdrt GroupNormSiLU(x, gamma, beta; groups: int, epsilon: float) -> out, then SiLU
//
// The exported graph declares each of these as an ONNX function whose body is the standard or com.microsoft
// operators (export/native_graph.py), so a graph runs the same without this library, only slower.
//
// The ONNX Runtime wheel ships no C headers, so this file declares the little of its C API it uses. The API
// is a table of function pointers (OrtApi) that only ever grows at its end; the slots below are those of
// API version 1, fetched through GetApi(13) with a 13-field OrtCustomOp (the custom-op struct of version 13,
// which ONNX Runtime keeps reading as such). A NULL status pointer means success.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"
#include "group_norm.h"

extern "C" {
struct OrtStatus;
struct OrtApi;  // opaque here: reached as an array of function pointers
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  int (*GetInputType)(const OrtCustomOp* op, size_t index);  // ONNXTensorElementDataType
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  int (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);  // 0: required
  int (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);  // 0: the provider's default
};
}

namespace {

constexpr uint32_t kApiVersion = 13;
constexpr int kFloat = 1;  // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT

// OrtApi slots (0-based), fixed since API version 1.
enum Slot : size_t {
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
};

template <typename Fn>
Fn slot(const OrtApi* api, Slot s) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[s]);
}

// true when the call succeeded; a failure's status is released (the caller reports through its own result)
bool ok(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return true;
  slot<void (*)(OrtStatus*)>(api, kReleaseStatus)(status);
  return false;
}

std::atomic<uint64_t> attention_calls{0};
std::atomic<uint64_t> group_norm_calls{0};

struct Tensor {
  const float* data = nullptr;
  int64_t dims[8] = {};
  size_t rank = 0;
  int64_t size() const {
    int64_t n = 1;
    for (size_t i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
};

// A float input of rank 1 to 8; false when it can't be read.
bool input(const OrtApi* api, OrtKernelContext* ctx, size_t index, Tensor& out) {
  using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  using TypeAndShape = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using DimsCount = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using Dims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using MutableData = OrtStatus* (*)(OrtValue*, void**);
  const OrtValue* value = nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  void* data = nullptr;
  if (!ok(api, slot<GetInput>(api, kKernelContextGetInput)(ctx, index, &value)) || value == nullptr) return false;
  if (!ok(api, slot<TypeAndShape>(api, kGetTensorTypeAndShape)(value, &info))) return false;
  bool good = ok(api, slot<DimsCount>(api, kGetDimensionsCount)(info, &out.rank)) && out.rank >= 1 &&
              out.rank <= 8 && ok(api, slot<Dims>(api, kGetDimensions)(info, out.dims, out.rank));
  slot<void (*)(OrtTensorTypeAndShapeInfo*)>(api, kReleaseTensorTypeAndShapeInfo)(info);
  good = good && ok(api, slot<MutableData>(api, kGetTensorMutableData)(const_cast<OrtValue*>(value), &data));
  out.data = static_cast<const float*>(data);
  return good;
}

// Output 0 with the given shape, or nullptr.
float* output(const OrtApi* api, OrtKernelContext* ctx, const Tensor& like) {
  using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  using MutableData = OrtStatus* (*)(OrtValue*, void**);
  OrtValue* value = nullptr;
  void* data = nullptr;
  if (!ok(api, slot<GetOutput>(api, kKernelContextGetOutput)(ctx, 0, like.dims, like.rank, &value)) ||
      !ok(api, slot<MutableData>(api, kGetTensorMutableData)(value, &data)))
    return nullptr;
  return static_cast<float*>(data);
}

// A malformed call (which the exporter never writes) gets NaNs, which sdrt's pipeline reports as such:
// a version-1 kernel has no way to return an error.
void fill_nan(float* out, int64_t n) { std::fill(out, out + n, std::numeric_limits<float>::quiet_NaN()); }

// What every operator here is: its ONNX name, its input count, and what one call does with its attributes.
struct OpDef {
  OrtCustomOp op;  // first: ONNX Runtime's callbacks receive &op, which is the OpDef
  const char* name;
  size_t inputs;
  bool silu;  // GroupNormSiLU
};

struct Kernel {
  const OrtApi* api;
  const OpDef* def;
  int64_t count;  // num_heads (Attention), groups (GroupNorm)
  float value;    // scale (Attention), epsilon (GroupNorm)

  void attention(OrtKernelContext* ctx) const {
    Tensor q, k, v;
    float* out = input(api, ctx, 0, q) ? output(api, ctx, q) : nullptr;  // shaped like q, whatever else is wrong
    if (out == nullptr) return;
    const int64_t width = q.dims[2];
    const bool valid = input(api, ctx, 1, k) && input(api, ctx, 2, v) && q.rank == 3 && k.rank == 3 &&
                       v.rank == 3 && count > 0 && width % count == 0 && k.dims[0] == q.dims[0] &&
                       v.dims[0] == q.dims[0] && k.dims[1] == v.dims[1] && k.dims[2] == width &&
                       v.dims[2] == width && k.dims[1] > 0;
    if (!valid) return fill_nan(out, q.size());
    sdrt::attention(q.data, k.data, v.data, out, q.dims[0], q.dims[1], k.dims[1], count, width / count, value);
    attention_calls.fetch_add(1, std::memory_order_relaxed);
  }

  void group_norm(OrtKernelContext* ctx) const {
    Tensor x, gamma, beta;
    float* out = input(api, ctx, 0, x) ? output(api, ctx, x) : nullptr;  // shaped like x
    if (out == nullptr) return;
    const int64_t N = x.dims[0], C = x.rank >= 2 ? x.dims[1] : 0, spatial = x.size() / std::max<int64_t>(1, N * C);
    const bool valid = input(api, ctx, 1, gamma) && input(api, ctx, 2, beta) && x.rank >= 2 && count > 0 &&
                       C % count == 0 && gamma.size() == C && beta.size() == C;
    if (!valid) return fill_nan(out, x.size());
    sdrt::group_norm(x.data, gamma.data, beta.data, out, N, C, spatial, count, value, def->silu);
    group_norm_calls.fetch_add(1, std::memory_order_relaxed);
  }
};

void* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  using GetInt = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
  using GetFloat = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
  const OpDef* def = reinterpret_cast<const OpDef*>(op);
  const bool attention = std::strcmp(def->name, "Attention") == 0;
  int64_t count = 0;
  float value = 0.f;
  if (!ok(api, slot<GetInt>(api, kKernelInfoGetAttributeInt64)(info, attention ? "num_heads" : "groups", &count)))
    count = 0;
  if (!ok(api, slot<GetFloat>(api, kKernelInfoGetAttributeFloat)(info, attention ? "scale" : "epsilon", &value)))
    value = attention ? 0.f : 1e-5f;
  return new Kernel{api, def, count, value};
}

OpDef define(const char* name, size_t inputs, bool silu) {
  OpDef def{};
  def.name = name;
  def.inputs = inputs;
  def.silu = silu;
  OrtCustomOp& op = def.op;
  op.version = kApiVersion;
  op.CreateKernel = create_kernel;
  op.GetName = [](const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op)->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op)->inputs; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelCompute = [](void* kernel, OrtKernelContext* ctx) {
    const Kernel* k = static_cast<Kernel*>(kernel);
    if (std::strcmp(k->def->name, "Attention") == 0) k->attention(ctx); else k->group_norm(ctx);
  };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return 0; };
  return def;
}

// ONNX Runtime keeps these pointers: they must outlive every session.
const OpDef kOps[] = {define("Attention", 3, false), define("GroupNorm", 3, false), define("GroupNormSiLU", 3, true)};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  using CreateDomain = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
  using DomainAdd = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
  using AddDomain = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
  const OrtApi* api = base->GetApi(kApiVersion);
  if (api == nullptr) return nullptr;  // an older runtime: register nothing, the graph's functions run instead
  OrtCustomOpDomain* domain = nullptr;  // ONNX Runtime keeps a pointer for the sessions' lifetime: never released
  OrtStatus* status = slot<CreateDomain>(api, kCreateCustomOpDomain)("ai.sdrt", &domain);
  for (const OpDef& def : kOps)
    if (status == nullptr) status = slot<DomainAdd>(api, kCustomOpDomainAdd)(domain, &def.op);
  if (status == nullptr) status = slot<AddDomain>(api, kAddCustomOpDomain)(options, domain);
  return status;
}

// How many calls each kernel has computed, for tests that check the kernel is the one running.
__attribute__((visibility("default"))) uint64_t sdrt_ops_attention_calls() { return attention_calls.load(); }
__attribute__((visibility("default"))) uint64_t sdrt_ops_group_norm_calls() { return group_norm_calls.load(); }

}  // extern "C"
