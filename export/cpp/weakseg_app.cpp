// weakseg_app — segment one image with a model exported by `weakseg export`.
//
//   weakseg_app --model DIR --image IN.ppm --out LABELS.png [--engine aoti|tensorrt] [--raw-out LABELS.u8]
//
// DIR is an exported model directory: embeddings.json + embeddings.bin (the class text embeddings, raw
// little-endian float32 C x D) and model.pt2 (AOTInductor package, loaded through libtorch's
// torch::inductor::AOTIModelPackageLoader) or model.engine (TensorRT, when built with it).
// The image is a binary PPM (P6, maxval 255). The pipeline mirrors weakseg.export.runner: bilinear
// resize to S x S (align_corners = false, no antialiasing), (x / 255 - mean) / std, the model, the
// background rule of embeddings.json, nearest resampling of the labels to the image size with source
// index (y * S) / H. The label map is written as an 8-bit grayscale PNG (stored deflate blocks).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef WEAKSEG_WITH_TENSORRT
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#endif

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---------------------------------------------------------------- the JSON sidecar (flat object)
// Finds "key": and returns the position just after the colon.
size_t json_key(const std::string& js, const std::string& key) {
  const std::string pat = "\"" + key + "\"";
  size_t p = js.find(pat);
  if (p == std::string::npos) fail("embeddings.json: missing key '" + key + "'");
  p = js.find(':', p + pat.size());
  if (p == std::string::npos) fail("embeddings.json: malformed near '" + key + "'");
  return p + 1;
}

double json_number(const std::string& js, const std::string& key) {
  size_t p = json_key(js, key);
  return std::strtod(js.c_str() + p, nullptr);
}

std::string json_string_at(const std::string& js, size_t& p) {
  p = js.find('"', p);
  if (p == std::string::npos) fail("embeddings.json: expected a string");
  std::string out;
  for (++p; p < js.size() && js[p] != '"'; ++p) {
    if (js[p] == '\\' && p + 1 < js.size()) {
      char c = js[++p];
      out += (c == 'n') ? '\n' : (c == 't') ? '\t' : c;  // \uXXXX is not needed for the keys we read
    } else {
      out += js[p];
    }
  }
  ++p;
  return out;
}

std::string json_string(const std::string& js, const std::string& key) {
  size_t p = json_key(js, key);
  return json_string_at(js, p);
}

std::vector<double> json_numbers(const std::string& js, const std::string& key) {
  size_t p = js.find('[', json_key(js, key));
  size_t e = js.find(']', p);
  std::vector<double> v;
  const char* s = js.c_str() + p + 1;
  while (s < js.c_str() + e) {
    char* end = nullptr;
    double d = std::strtod(s, &end);
    if (end == s) { ++s; continue; }
    v.push_back(d);
    s = end;
  }
  return v;
}

struct Sidecar {
  int num_classes = 0, dim = 0, input_size = 0;
  std::string file, background_kind;
  double background_value = 0.0;
  std::array<float, 3> mean{}, std{};
};

Sidecar read_sidecar(const std::string& dir) {
  const std::string js = read_text(dir + "/embeddings.json");
  Sidecar s;
  s.num_classes = static_cast<int>(json_number(js, "num_classes"));
  s.dim = static_cast<int>(json_number(js, "dim"));
  s.input_size = static_cast<int>(json_number(js, "input_size"));
  if (json_string(js, "dtype") != "float32" || json_string(js, "byte_order") != "little")
    fail("embeddings.json: only little-endian float32 embeddings are supported");
  s.file = json_string(js, "file");
  s.background_kind = json_string(js, "background_kind");
  s.background_value = json_number(js, "background_value");
  auto m = json_numbers(js, "mean"), d = json_numbers(js, "std");
  if (m.size() != 3 || d.size() != 3) fail("embeddings.json: mean/std need 3 values");
  for (int i = 0; i < 3; ++i) { s.mean[i] = float(m[i]); s.std[i] = float(d[i]); }
  if (s.num_classes < 1 || s.dim < 1 || s.input_size < 1) fail("embeddings.json: bad sizes");
  return s;
}

std::vector<float> read_embeddings(const std::string& dir, const Sidecar& s) {
  const std::string raw = read_text(dir + "/" + s.file);
  const size_t n = size_t(s.num_classes) * size_t(s.dim);
  if (raw.size() != n * 4) fail(s.file + ": expected " + std::to_string(n * 4) + " bytes");
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {  // little-endian bytes -> float, whatever the host order
    const auto* b = reinterpret_cast<const unsigned char*>(raw.data() + 4 * i);
    uint32_t u = uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
    std::memcpy(&v[i], &u, 4);
  }
  return v;
}

// ---------------------------------------------------------------- image in (PPM P6)
struct Image {
  int w = 0, h = 0;
  std::vector<uint8_t> rgb;  // h * w * 3, interleaved
};

Image read_ppm(const std::string& path) {
  const std::string data = read_text(path);
  size_t p = 0;
  auto token = [&]() {
    while (p < data.size()) {
      if (data[p] == '#') { while (p < data.size() && data[p] != '\n') ++p; }
      else if (std::isspace(static_cast<unsigned char>(data[p]))) ++p;
      else break;
    }
    size_t s = p;
    while (p < data.size() && !std::isspace(static_cast<unsigned char>(data[p]))) ++p;
    return data.substr(s, p - s);
  };
  if (token() != "P6") fail(path + ": not a binary PPM (P6)");
  Image im;
  im.w = std::stoi(token());
  im.h = std::stoi(token());
  if (std::stoi(token()) != 255) fail(path + ": only maxval 255 is supported");
  ++p;  // the single whitespace after maxval
  const size_t n = size_t(im.w) * im.h * 3;
  if (im.w < 1 || im.h < 1 || data.size() < p + n) fail(path + ": truncated pixel data");
  im.rgb.assign(data.begin() + p, data.begin() + p + n);
  return im;
}

// ---------------------------------------------------------------- PNG out (stored deflate)
uint32_t crc32(const uint8_t* d, size_t n, uint32_t c = 0) {
  static uint32_t table[256];
  static bool init = false;
  if (!init) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t r = i;
      for (int k = 0; k < 8; ++k) r = (r & 1) ? 0xEDB88320u ^ (r >> 1) : r >> 1;
      table[i] = r;
    }
    init = true;
  }
  c = ~c;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ d[i]) & 0xFF] ^ (c >> 8);
  return ~c;
}

void put32(std::vector<uint8_t>& o, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) o.push_back(uint8_t(v >> s));
}

void chunk(std::vector<uint8_t>& png, const char* type, const std::vector<uint8_t>& body) {
  put32(png, uint32_t(body.size()));
  std::vector<uint8_t> tb(type, type + 4);
  tb.insert(tb.end(), body.begin(), body.end());
  png.insert(png.end(), tb.begin(), tb.end());
  put32(png, crc32(tb.data(), tb.size()));
}

void write_png_gray(const std::string& path, const std::vector<uint8_t>& px, int w, int h) {
  std::vector<uint8_t> raw;  // filter byte 0 + row
  raw.reserve(size_t(h) * (w + 1));
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), px.begin() + size_t(y) * w, px.begin() + size_t(y + 1) * w);
  }
  std::vector<uint8_t> z = {0x78, 0x01};  // zlib header, no compression
  uint32_t a = 1, b = 0;
  for (uint8_t v : raw) { a = (a + v) % 65521u; b = (b + a) % 65521u; }
  for (size_t off = 0; off < raw.size() || off == 0; off += 65535) {
    const size_t len = std::min<size_t>(65535, raw.size() - off);
    const bool last = off + len >= raw.size();
    z.push_back(last ? 1 : 0);
    z.push_back(uint8_t(len & 0xFF)); z.push_back(uint8_t(len >> 8));
    z.push_back(uint8_t(~len & 0xFF)); z.push_back(uint8_t((~len >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + off, raw.begin() + off + len);
    if (last) break;
  }
  put32(z, (b << 16) | a);
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put32(ihdr, uint32_t(w)); put32(ihdr, uint32_t(h));
  ihdr.insert(ihdr.end(), {8, 0, 0, 0, 0});  // 8-bit grayscale, deflate, filter 0, no interlace
  chunk(png, "IHDR", ihdr);
  chunk(png, "IDAT", z);
  chunk(png, "IEND", {});
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) fail("cannot write " + path);
    f.write(reinterpret_cast<const char*>(png.data()), std::streamsize(png.size()));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot move " + tmp + " to " + path);
}

// ---------------------------------------------------------------- pre / post-processing
// uint8 HWC -> normalised float CHW at S x S, bilinear, align_corners = false (PyTorch's source index).
std::vector<float> preprocess(const Image& im, int S, const Sidecar& sc) {
  std::vector<float> out(size_t(3) * S * S);
  const float sy = float(im.h) / float(S), sx = float(im.w) / float(S);
  for (int y = 0; y < S; ++y) {
    float fy = std::max(0.0f, (float(y) + 0.5f) * sy - 0.5f);
    int y0 = std::min(int(fy), im.h - 1), y1 = std::min(y0 + 1, im.h - 1);
    float ly = fy - float(y0), hy = 1.0f - ly;
    for (int x = 0; x < S; ++x) {
      float fx = std::max(0.0f, (float(x) + 0.5f) * sx - 0.5f);
      int x0 = std::min(int(fx), im.w - 1), x1 = std::min(x0 + 1, im.w - 1);
      float lx = fx - float(x0), hx = 1.0f - lx;
      for (int c = 0; c < 3; ++c) {
        auto at = [&](int yy, int xx) { return float(im.rgb[(size_t(yy) * im.w + xx) * 3 + c]); };
        float v = hy * (hx * at(y0, x0) + lx * at(y0, x1)) + ly * (hx * at(y1, x0) + lx * at(y1, x1));
        out[(size_t(c) * S + y) * S + x] = (v / 255.0f - sc.mean[c]) / sc.std[c];
      }
    }
  }
  return out;
}

// logits (C, S, S) -> labels (H, W) under the background rule, nearest source index (y * S) / H.
std::vector<uint8_t> labels_of(const float* logits, int C, int S, int H, int W, const Sidecar& sc) {
  std::vector<uint8_t> small(size_t(S) * S);
  const bool thr = sc.background_kind == "threshold";
  if (!thr && sc.background_kind != "none") fail("embeddings.json: unknown background_kind " + sc.background_kind);
  for (size_t p = 0; p < size_t(S) * S; ++p) {
    int best = 0;
    float bv = logits[p];
    for (int c = 1; c < C; ++c) {
      float v = logits[size_t(c) * S * S + p];
      if (v > bv) { bv = v; best = c; }
    }
    int lab = thr ? (bv < float(sc.background_value) ? 0 : best + 1) : best;
    small[p] = uint8_t(std::min(lab, 255));
  }
  std::vector<uint8_t> out(size_t(H) * W);
  for (int y = 0; y < H; ++y) {
    const int sy = int((int64_t(y) * S) / H);
    for (int x = 0; x < W; ++x) out[size_t(y) * W + x] = small[size_t(sy) * S + int((int64_t(x) * S) / W)];
  }
  return out;
}

// ---------------------------------------------------------------- engines
std::vector<float> run_aoti(const std::string& dir, const std::vector<float>& img, int S,
                            const std::vector<float>& emb, const Sidecar& sc) {
  torch::inductor::AOTIModelPackageLoader loader(dir + "/model.pt2");
  at::Tensor x = at::from_blob(const_cast<float*>(img.data()), {1, 3, S, S}, at::kFloat).clone();
  at::Tensor t = at::from_blob(const_cast<float*>(emb.data()), {sc.num_classes, sc.dim}, at::kFloat).clone();
  std::vector<at::Tensor> out = loader.run({x, t});
  if (out.empty()) fail("model.pt2 returned no output");
  at::Tensor lg = out[0].to(at::kCPU, at::kFloat).contiguous();
  if (lg.dim() != 4 || lg.size(1) != sc.num_classes || lg.size(2) != S || lg.size(3) != S)
    fail("model.pt2: unexpected output shape");
  return std::vector<float>(lg.data_ptr<float>(), lg.data_ptr<float>() + lg.numel());
}

#ifdef WEAKSEG_WITH_TENSORRT
struct TrtLogger : nvinfer1::ILogger {
  void log(Severity s, const char* msg) noexcept override {
    if (s <= Severity::kWARNING) std::cerr << "[tensorrt] " << msg << "\n";
  }
};

std::vector<float> run_tensorrt(const std::string& dir, const std::vector<float>& img, int S,
                                const std::vector<float>& emb, const Sidecar& sc) {
  static TrtLogger logger;
  const std::string plan = read_text(dir + "/model.engine");
  std::unique_ptr<nvinfer1::IRuntime> rt(nvinfer1::createInferRuntime(logger));
  std::unique_ptr<nvinfer1::ICudaEngine> eng(rt->deserializeCudaEngine(plan.data(), plan.size()));
  if (!eng) fail("model.engine: cannot deserialise");
  std::unique_ptr<nvinfer1::IExecutionContext> ctx(eng->createExecutionContext());
  ctx->setInputShape("images", nvinfer1::Dims4{1, 3, S, S});
  nvinfer1::Dims2 td{sc.num_classes, sc.dim};
  ctx->setInputShape("text_embeddings", td);
  const size_t nout = size_t(sc.num_classes) * S * S;
  void *di = nullptr, *dt = nullptr, *dout = nullptr;
  cudaMalloc(&di, img.size() * 4); cudaMalloc(&dt, emb.size() * 4); cudaMalloc(&dout, nout * 4);
  cudaMemcpy(di, img.data(), img.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dt, emb.data(), emb.size() * 4, cudaMemcpyHostToDevice);
  ctx->setTensorAddress("images", di);
  ctx->setTensorAddress("text_embeddings", dt);
  ctx->setTensorAddress("logits", dout);
  cudaStream_t st;
  cudaStreamCreate(&st);
  const bool ok = ctx->enqueueV3(st);
  cudaStreamSynchronize(st);
  std::vector<float> out(nout);
  cudaMemcpy(out.data(), dout, nout * 4, cudaMemcpyDeviceToHost);
  cudaFree(di); cudaFree(dt); cudaFree(dout); cudaStreamDestroy(st);
  if (!ok) fail("TensorRT enqueueV3 failed");
  return out;
}
#endif

int usage() {
  std::cerr << "usage: weakseg_app --model DIR --image IN.ppm --out LABELS.png [--engine aoti|tensorrt] "
               "[--raw-out LABELS.u8]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, image, out, raw_out, engine = "aoti";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--model") model = next();
      else if (a == "--image") image = next();
      else if (a == "--out") out = next();
      else if (a == "--raw-out") raw_out = next();
      else if (a == "--engine") engine = next();
      else if (a == "-h" || a == "--help") return usage(), 0;
      else { std::cerr << "unknown argument " << a << "\n"; return usage(); }
    } catch (const std::exception& e) { std::cerr << e.what() << "\n"; return usage(); }
  }
  if (model.empty() || image.empty() || out.empty()) return usage();
  try {
    const Sidecar sc = read_sidecar(model);
    const std::vector<float> emb = read_embeddings(model, sc);
    const Image im = read_ppm(image);
    const int S = sc.input_size;
    const std::vector<float> x = preprocess(im, S, sc);
    std::vector<float> logits;
    if (engine == "aoti") {
      logits = run_aoti(model, x, S, emb, sc);
    } else if (engine == "tensorrt") {
#ifdef WEAKSEG_WITH_TENSORRT
      logits = run_tensorrt(model, x, S, emb, sc);
#else
      fail("--engine tensorrt: this build has no TensorRT backend (configure with WEAKSEG_APP_TENSORRT=ON)");
#endif
    } else {
      fail("--engine: expected aoti or tensorrt, got " + engine);
    }
    const std::vector<uint8_t> labels = labels_of(logits.data(), sc.num_classes, S, im.h, im.w, sc);
    write_png_gray(out, labels, im.w, im.h);
    if (!raw_out.empty()) {
      std::ofstream f(raw_out, std::ios::binary);
      f.write(reinterpret_cast<const char*>(labels.data()), std::streamsize(labels.size()));
    }
    std::cout << "weakseg_app: " << im.w << "x" << im.h << " -> " << out << " (" << sc.num_classes
              << " classes, engine " << engine << ")\n";
  } catch (const std::exception& e) {
    std::cerr << "weakseg_app: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
