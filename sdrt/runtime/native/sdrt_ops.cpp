// sdrt's operators for ONNX Runtime's CPU execution provider, as a custom-operator library
// (SessionOptions.register_custom_ops_library). Built on the user's machine by sdrt/runtime/native_ops.py.
//
//   ai.sdrt Attention(q, k, v; num_heads: int, scale: float) -> out   (attention.h)
//
// The exported graph declares each of these as an ONNX function whose body is the standard or com.microsoft
// operators (export/cpu_graph.py), so a graph runs the same without this library, only slower.
//
// The ONNX Runtime wheel ships no C headers, so this file declares the little of its C API it uses. The API
// is a table of function pointers (OrtApi) that only ever grows at its end; the slots below are those of
// API version 1, fetched through GetApi(13) with a 13-field OrtCustomOp (the custom-op struct of version 13,
// which ONNX Runtime keeps reading as such). A NULL status pointer means success.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"

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
  kCreateStatus = 0,
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

struct Tensor {
  const float* data = nullptr;
  int64_t dims[3] = {0, 0, 0};
};

// A (B, N, C) float input; false when it is not rank 3.
bool input3(const OrtApi* api, OrtKernelContext* ctx, size_t index, Tensor& out) {
  using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  using TypeAndShape = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using DimsCount = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using Dims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using MutableData = OrtStatus* (*)(OrtValue*, void**);
  const OrtValue* value = nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  size_t rank = 0;
  void* data = nullptr;
  if (!ok(api, slot<GetInput>(api, kKernelContextGetInput)(ctx, index, &value)) || value == nullptr) return false;
  if (!ok(api, slot<TypeAndShape>(api, kGetTensorTypeAndShape)(value, &info))) return false;
  bool good = ok(api, slot<DimsCount>(api, kGetDimensionsCount)(info, &rank)) && rank == 3 &&
              ok(api, slot<Dims>(api, kGetDimensions)(info, out.dims, 3));
  slot<void (*)(OrtTensorTypeAndShapeInfo*)>(api, kReleaseTensorTypeAndShapeInfo)(info);
  good = good && ok(api, slot<MutableData>(api, kGetTensorMutableData)(const_cast<OrtValue*>(value), &data));
  out.data = static_cast<const float*>(data);
  return good;
}

struct AttentionKernel {
  const OrtApi* api;
  int64_t heads;
  float scale;

  // A malformed call (which the exporter never writes) gets NaNs, which sdrt's pipeline reports as such:
  // a version-1 kernel has no way to return an error.
  void compute(OrtKernelContext* ctx) const {
    using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    using MutableData = OrtStatus* (*)(OrtValue*, void**);
    Tensor q, k, v;
    const bool inputs = input3(api, ctx, 0, q) && input3(api, ctx, 1, k) && input3(api, ctx, 2, v);
    OrtValue* out_value = nullptr;
    void* out = nullptr;
    if (!ok(api, slot<GetOutput>(api, kKernelContextGetOutput)(ctx, 0, q.dims, 3, &out_value)) ||
        !ok(api, slot<MutableData>(api, kGetTensorMutableData)(out_value, &out)) || out == nullptr)
      return;
    float* o = static_cast<float*>(out);
    const int64_t width = q.dims[2];
    const bool valid = inputs && heads > 0 && width % heads == 0 && k.dims[0] == q.dims[0] &&
                       v.dims[0] == q.dims[0] && k.dims[1] == v.dims[1] && k.dims[2] == width &&
                       v.dims[2] == width && k.dims[1] > 0;
    if (!valid) {
      std::fill(o, o + q.dims[0] * q.dims[1] * width, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    sdrt::attention(q.data, k.data, v.data, o, q.dims[0], q.dims[1], k.dims[1], heads, width / heads, scale);
    attention_calls.fetch_add(1, std::memory_order_relaxed);
  }
};

void* create_attention(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info) {
  using GetInt = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
  using GetFloat = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
  int64_t heads = 0;
  float scale = 0.f;
  if (!ok(api, slot<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "num_heads", &heads))) heads = 0;
  if (!ok(api, slot<GetFloat>(api, kKernelInfoGetAttributeFloat)(info, "scale", &scale))) scale = 0.f;
  return new AttentionKernel{api, heads, scale};
}

OrtCustomOp attention_op() {
  OrtCustomOp op{};
  op.version = kApiVersion;
  op.CreateKernel = create_attention;
  op.GetName = [](const OrtCustomOp*) { return "Attention"; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelCompute = [](void* kernel, OrtKernelContext* ctx) { static_cast<AttentionKernel*>(kernel)->compute(ctx); };
  op.KernelDestroy = [](void* kernel) { delete static_cast<AttentionKernel*>(kernel); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return 0; };
  return op;
}

const OrtCustomOp kAttention = attention_op();  // ONNX Runtime keeps the pointer: it must outlive every session

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  using CreateDomain = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
  using DomainAdd = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
  using AddDomain = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
  const OrtApi* api = base->GetApi(kApiVersion);
  if (api == nullptr) return nullptr;  // an older runtime: register nothing, the graph's functions run instead
  OrtCustomOpDomain* domain = nullptr;  // owned by the session options from here on (ONNX Runtime's contract)
  OrtStatus* status = slot<CreateDomain>(api, kCreateCustomOpDomain)("ai.sdrt", &domain);
  if (status == nullptr) status = slot<DomainAdd>(api, kCustomOpDomainAdd)(domain, &kAttention);
  if (status == nullptr) status = slot<AddDomain>(api, kAddCustomOpDomain)(options, domain);
  return status;
}

// How many Attention calls this library has computed, for tests that check the kernel is the one running.
__attribute__((visibility("default"))) uint64_t sdrt_ops_attention_calls() { return attention_calls.load(); }

}  // extern "C"
