// difftx-et-runner: runs the "forward" method of one ExecuTorch program (.pte) with the XNNPACK backend and
// prints one JSON object (load time, per-run latencies, peak memory) on stdout.
//
// It is the smallest process that can hold a .pte: a device sees its memory, not the ~430 MB of a Python
// interpreter that imports the runtime. Built by difftx_edge.runtimes.native against the headers and shared
// libraries of the executorch wheel; see that module for the compile line.

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <unistd.h>

#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

// The wheel ships libexecutorch_threadpool.so but not extension/threadpool/threadpool.h. These declarations
// match that header in executorch 1.5.1; only non-virtual members are called, so the layout is not needed.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Span;
using executorch::runtime::Tag;
using executorch::runtime::etensor::TensorImpl;
using Clock = std::chrono::steady_clock;

constexpr const char* kMethod = "forward";

// The runtime's last few error-level log lines, the ones that led to a failure: its Error codes alone
// ("OperatorMissing") do not name the operator.
std::vector<std::string> g_runtime_errors;
constexpr size_t kRuntimeErrorsKept = 4;

[[noreturn]] void fail(int code, const char* fmt, ...) {
  char message[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof(message), fmt, args);
  va_end(args);
  std::string line = message;
  if (code == 1 && !g_runtime_errors.empty()) {
    line += " (";
    for (size_t i = 0; i < g_runtime_errors.size(); ++i) {
      line += (i ? "; " : "") + g_runtime_errors[i];
    }
    line += ")";
  }
  // One printable line, whatever bytes a corrupt file put into the runtime's message.
  for (char& c : line) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) {
      c = '?';
    }
  }
  std::fprintf(stderr, "difftx-et-runner: error: %s\n", line.c_str());
  std::exit(code);
}

[[noreturn]] void fail_error(const char* what, Error error) {
  fail(1, "%s: %s (0x%x)", what, executorch::runtime::to_string(error), static_cast<unsigned>(error));
}

// Keeps stderr for progress and the one error line: error logs are held for that line, fatal ones (an
// internal check that is about to abort) are printed at once because nothing runs after them.
void on_runtime_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                    const char* message, size_t length) {
  std::string text(message, length);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) {
    text.pop_back();
  }
  if (level == kFatal) {
    std::fprintf(stderr, "difftx-et-runner: error: runtime check failed: %s\n", text.c_str());
  } else if (level == kError) {
    if (g_runtime_errors.size() == kRuntimeErrorsKept) {
      g_runtime_errors.erase(g_runtime_errors.begin());
    }
    g_runtime_errors.push_back(text);
  }
}

// What the runner is doing, for the line a crash prints.
const char* volatile g_stage = "starting";

// A delegate's payload (XNNPACK's flatbuffer and weights) is opaque to the program's verification, so a corrupt
// one can still fault inside the backend. Say where in one line, then die of the same signal.
void on_crash(int signal) {
  const char* name = signal == SIGSEGV ? "SIGSEGV" : signal == SIGBUS ? "SIGBUS" : signal == SIGFPE ? "SIGFPE"
                                                                                                     : "SIGILL";
  const char* parts[] = {"difftx-et-runner: error: ", name, " while ", g_stage, " (corrupt model?)\n"};
  for (const char* part : parts) {
    ssize_t ignored = write(STDERR_FILENO, part, std::strlen(part));
    (void)ignored;
  }
  std::signal(signal, SIG_DFL);
  std::raise(signal);
}

struct Memory {
  long hwm_kb = -1;
  long rss_kb = -1;
};

// VmHWM is the process's peak resident set, the number a device's memory budget is held against.
Memory read_memory() {
  Memory memory;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      memory.hwm_kb = std::strtol(line.c_str() + 6, nullptr, 10);
    } else if (line.rfind("VmRSS:", 0) == 0) {
      memory.rss_kb = std::strtol(line.c_str() + 6, nullptr, 10);
    }
  }
  return memory;
}

std::string json_kb(long kb) {
  return kb < 0 ? "null" : std::to_string(kb);
}

// numpy's names, so the host can build arrays from the JSON without a table of its own.
const char* dtype_name(ScalarType type) {
  switch (type) {
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Half: return "float16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Bool: return "bool";
    case ScalarType::BFloat16: return "bfloat16";
    default: return nullptr;
  }
}

template <typename T>
void append_as_float(const void* data, size_t n, std::vector<float>& out) {
  const T* values = static_cast<const T*>(data);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(static_cast<float>(values[i]));
  }
}

void append_output(size_t index, const EValue& value, std::vector<float>& out) {
  if (!value.isTensor()) {
    fail(1, "output %zu is not a tensor", index);
  }
  const auto& tensor = value.toTensor();
  const void* data = tensor.const_data_ptr();
  const size_t n = tensor.numel();
  switch (tensor.scalar_type()) {
    case ScalarType::Float: append_as_float<float>(data, n, out); break;
    case ScalarType::Double: append_as_float<double>(data, n, out); break;
    case ScalarType::Half: append_as_float<executorch::aten::Half>(data, n, out); break;
    case ScalarType::BFloat16: append_as_float<executorch::aten::BFloat16>(data, n, out); break;
    case ScalarType::Byte: append_as_float<uint8_t>(data, n, out); break;
    case ScalarType::Char: append_as_float<int8_t>(data, n, out); break;
    case ScalarType::Short: append_as_float<int16_t>(data, n, out); break;
    case ScalarType::Int: append_as_float<int32_t>(data, n, out); break;
    case ScalarType::Long: append_as_float<int64_t>(data, n, out); break;
    case ScalarType::Bool: append_as_float<bool>(data, n, out); break;
    default: fail(1, "output %zu has dtype %d, which cannot be written as float32", index,
                  static_cast<int>(tensor.scalar_type()));
  }
}

struct Options {
  std::string model;
  std::string input;
  std::string output;
  long threads = 1;
  long warmup = 0;
  long runs = -1;
  double seconds = -1;
  bool progress = false;
};

long parse_count(const char* flag, const char* text, long minimum) {
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || value < minimum) {
    fail(2, "%s needs an integer >= %ld, got '%s'", flag, minimum, text);
  }
  return value;
}

Options parse_args(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--progress") {
      options.progress = true;
      continue;
    }
    if (i + 1 >= argc) {
      fail(2, "%s needs a value (usage: difftx-et-runner --model M.pte [--threads T] [--warmup W] "
              "[--runs R | --seconds S] [--input FILE] [--output FILE] [--progress])", flag.c_str());
    }
    const char* value = argv[++i];
    if (flag == "--model") {
      options.model = value;
    } else if (flag == "--input") {
      options.input = value;
    } else if (flag == "--output") {
      options.output = value;
    } else if (flag == "--threads") {
      options.threads = parse_count("--threads", value, 1);
    } else if (flag == "--warmup") {
      options.warmup = parse_count("--warmup", value, 0);
    } else if (flag == "--runs") {
      options.runs = parse_count("--runs", value, 0);
    } else if (flag == "--seconds") {
      char* end = nullptr;
      options.seconds = std::strtod(value, &end);
      if (*value == '\0' || *end != '\0' || !(options.seconds > 0)) {
        fail(2, "--seconds needs a number > 0, got '%s'", value);
      }
    } else {
      fail(2, "unknown argument '%s'", flag.c_str());
    }
  }
  if (options.model.empty()) {
    fail(2, "--model is required");
  }
  if (options.runs >= 0 && options.seconds > 0) {
    fail(2, "--runs and --seconds exclude each other");
  }
  if (options.runs < 0 && options.seconds < 0) {
    options.runs = 20;
  }
  return options;
}

// One input of the method: a tensor whose bytes are copied in from a batch before each execution.
struct Input {
  ScalarType type;
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> dim_order;
  std::vector<TensorImpl::StridesType> strides;
  size_t nbytes;
};

std::vector<Input> describe_inputs(const MethodMeta& meta) {
  std::vector<Input> inputs;
  for (size_t i = 0; i < meta.num_inputs(); ++i) {
    auto tag = meta.input_tag(i);
    if (!tag.ok() || tag.get() != Tag::Tensor) {
      fail(1, "input %zu of %s is not a tensor", i, kMethod);
    }
    auto info = meta.input_tensor_meta(i);
    if (!info.ok()) {
      fail_error("reading input metadata", info.error());
    }
    Input input{info->scalar_type(), {info->sizes().begin(), info->sizes().end()},
                {info->dim_order().begin(), info->dim_order().end()}, {}, info->nbytes()};
    input.strides.resize(input.sizes.size());
    Error error = executorch::runtime::dim_order_to_stride(input.sizes.data(), input.dim_order.data(),
                                                          input.sizes.size(), input.strides.data());
    if (error != Error::Ok) {
      fail_error("reading input dim order", error);
    }
    inputs.push_back(std::move(input));
  }
  return inputs;
}

std::string json_tensor(ScalarType type, const int32_t* sizes, size_t dims) {
  const char* name = dtype_name(type);
  std::string json = std::string("{\"dtype\":") + (name ? "\"" + std::string(name) + "\"" :
                                                   std::to_string(static_cast<int>(type))) + ",\"shape\":[";
  for (size_t d = 0; d < dims; ++d) {
    json += (d ? "," : "") + std::to_string(sizes[d]);
  }
  return json + "]}";
}

std::vector<std::string> describe_outputs(const MethodMeta& meta) {
  std::vector<std::string> outputs;
  for (size_t i = 0; i < meta.num_outputs(); ++i) {
    auto tag = meta.output_tag(i);
    if (!tag.ok() || tag.get() != Tag::Tensor) {
      fail(1, "output %zu of %s is not a tensor", i, kMethod);
    }
    auto info = meta.output_tensor_meta(i);
    if (!info.ok()) {
      fail_error("reading output metadata", info.error());
    }
    outputs.push_back(json_tensor(info->scalar_type(), info->sizes().data(), info->sizes().size()));
  }
  return outputs;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    fail(1, "cannot read input file %s", path.c_str());
  }
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const Memory baseline = read_memory();
  const Options options = parse_args(argc, argv);

  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(on_runtime_log, __FILE__));
  executorch::runtime::runtime_init();
  for (int signal : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    std::signal(signal, on_crash);
  }

  // XNNPACK takes the pool's pthreadpool when a delegate is initialised: resize it before loading, never after.
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) {
    fail(1, "no thread pool (cpuinfo could not read this CPU)");
  }
  if (pool->get_thread_count() != static_cast<size_t>(options.threads) &&
      !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(options.threads))) {
    fail(1, "cannot resize the thread pool to %ld threads", options.threads);
  }

  std::FILE* model_file = std::fopen(options.model.c_str(), "rb");
  if (model_file == nullptr) {
    fail(1, "cannot read model %s", options.model.c_str());
  }
  std::fclose(model_file);

  g_stage = "loading the program";
  const auto load_start = Clock::now();
  auto loader = executorch::extension::MmapDataLoader::from(
      options.model.c_str(), executorch::extension::MmapDataLoader::MlockConfig::NoMlock);
  if (!loader.ok()) {
    fail_error("opening the model", loader.error());
  }
  // Full verification: a truncated or corrupt file is refused here instead of crashing inside the parser.
  auto program = Program::load(&loader.get(), Program::Verification::InternalConsistency);
  if (!program.ok()) {
    fail_error("loading the program", program.error());
  }
  auto meta = program->method_meta(kMethod);
  if (!meta.ok()) {
    fail_error("reading method forward", meta.error());
  }

  std::vector<std::vector<uint8_t>> planned_buffers;
  std::vector<Span<uint8_t>> planned_spans;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    auto size = meta->memory_planned_buffer_size(i);
    if (!size.ok()) {
      fail_error("reading the memory plan", size.error());
    }
    planned_buffers.emplace_back(static_cast<size_t>(size.get()));
  }
  // The activation memory ExecuTorch planned ahead of time (delegates may allocate more of their own).
  size_t planned_bytes = 0;
  for (auto& buffer : planned_buffers) {
    planned_spans.emplace_back(buffer.data(), buffer.size());
    planned_bytes += buffer.size();
  }
  HierarchicalAllocator planned_memory({planned_spans.data(), planned_spans.size()});
  executorch::extension::MallocMemoryAllocator method_allocator;
  executorch::extension::MallocMemoryAllocator temp_allocator;
  MemoryManager memory_manager(&method_allocator, &planned_memory, &temp_allocator);

  g_stage = "loading method forward";
  auto method = program->load_method(kMethod, &memory_manager);
  if (!method.ok()) {
    fail_error("loading method forward", method.error());
  }
  const double load_ms = ms_since(load_start);

  std::vector<Input> inputs = describe_inputs(meta.get());
  std::vector<std::string> outputs = describe_outputs(meta.get());
  size_t batch_bytes = 0;
  for (const auto& input : inputs) {
    batch_bytes += input.nbytes;
  }

  size_t batches = 1;
  std::vector<uint8_t> data;
  if (!options.input.empty()) {
    data = read_file(options.input);
    if (batch_bytes == 0 || data.empty() || data.size() % batch_bytes != 0) {
      fail(2, "input file %s holds %zu bytes, not a multiple of one batch (%zu bytes)", options.input.c_str(),
           data.size(), batch_bytes);
    }
    batches = data.size() / batch_bytes;
  } else {
    data.assign(batch_bytes, 0);
  }

  // The first execution of the process is timed wherever it falls: it carries one-off costs (page faults,
  // XNNPACK's lazy packing) that the steady-state runs hide.
  double first_inference_ms = -1;
  auto execute = [&](size_t batch) {
    uint8_t* bytes = data.data() + batch * batch_bytes;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Input& input = inputs[i];
      TensorImpl impl(input.type, static_cast<ssize_t>(input.sizes.size()), input.sizes.data(), bytes,
                      input.dim_order.data(), input.strides.data());
      Error error = method->set_input(EValue(executorch::aten::Tensor(&impl)), i);
      if (error != Error::Ok) {
        fail_error("setting the input", error);
      }
      bytes += input.nbytes;
    }
    g_stage = "executing forward";
    const auto start = Clock::now();
    Error error = method->execute();
    const double ms = ms_since(start);
    if (error != Error::Ok) {
      fail_error("executing forward", error);
    }
    if (first_inference_ms < 0) {
      first_inference_ms = ms;
    }
    return ms;
  };

  if (!options.output.empty()) {
    std::FILE* out = std::fopen(options.output.c_str(), "wb");
    if (out == nullptr) {
      fail(1, "cannot write output file %s", options.output.c_str());
    }
    std::vector<float> values;
    for (size_t batch = 0; batch < batches; ++batch) {
      execute(batch);
      values.clear();
      for (size_t i = 0; i < method->outputs_size(); ++i) {
        append_output(i, method->get_output(i), values);
      }
      if (std::fwrite(values.data(), sizeof(float), values.size(), out) != values.size()) {
        fail(1, "cannot write output file %s", options.output.c_str());
      }
    }
    if (std::fclose(out) != 0) {
      fail(1, "cannot write output file %s", options.output.c_str());
    }
  }

  for (long i = 0; i < options.warmup; ++i) {
    execute(0);
  }

  // With --seconds the total is unknown, so progress goes out every twentieth of the time with "of": null.
  std::vector<double> times;
  double timed_ms = 0;
  const long every = std::max(1L, options.runs / 20);
  double next_report_ms = options.seconds * 1000 / 20;
  auto done = [&]() {
    if (options.runs >= 0) {
      return static_cast<long>(times.size()) >= options.runs;
    }
    return times.size() >= 3 && timed_ms >= options.seconds * 1000;
  };
  while (!done()) {
    times.push_back(execute(0));
    timed_ms += times.back();
    if (!options.progress) {
      continue;
    }
    if (options.runs >= 0 && (times.size() % every == 0 || static_cast<long>(times.size()) == options.runs)) {
      std::fprintf(stderr, "{\"progress\": %zu, \"of\": %ld}\n", times.size(), options.runs);
    } else if (options.runs < 0 && (timed_ms >= next_report_ms || done())) {
      std::fprintf(stderr, "{\"progress\": %zu, \"of\": null}\n", times.size());
      next_report_ms = timed_ms + options.seconds * 1000 / 20;
    }
    std::fflush(stderr);
  }

  const Memory peak = read_memory();
  std::string json = "{\"runner\":\"native\"";
  char number[64];
  std::snprintf(number, sizeof(number), "%.4f", load_ms);
  json += std::string(",\"load_ms\":") + number;
  if (first_inference_ms < 0) {
    json += ",\"first_inference_ms\":null";
  } else {
    std::snprintf(number, sizeof(number), "%.4f", first_inference_ms);
    json += std::string(",\"first_inference_ms\":") + number;
  }
  json += ",\"times_ms\":[";
  for (size_t i = 0; i < times.size(); ++i) {
    std::snprintf(number, sizeof(number), "%s%.4f", i ? "," : "", times[i]);
    json += number;
  }
  json += "],\"baseline_rss_kb\":" + json_kb(baseline.hwm_kb);
  json += ",\"peak_rss_kb\":" + json_kb(peak.hwm_kb);
  json += ",\"final_rss_kb\":" + json_kb(peak.rss_kb);
  json += ",\"planned_bytes\":" + std::to_string(planned_bytes);
  json += ",\"threads\":" + std::to_string(pool->get_thread_count());
  json += ",\"inputs\":[";
  for (size_t i = 0; i < inputs.size(); ++i) {
    json += (i ? "," : "") + json_tensor(inputs[i].type, inputs[i].sizes.data(), inputs[i].sizes.size());
  }
  json += "],\"outputs\":[";
  for (size_t i = 0; i < outputs.size(); ++i) {
    json += (i ? "," : "") + outputs[i];
  }
  json += "],\"batches\":" + std::to_string(batches) + "}";
  std::printf("%s\n", json.c_str());
  return 0;
}
