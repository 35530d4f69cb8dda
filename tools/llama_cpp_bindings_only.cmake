# Included by `make setup` into llama.cpp's own CMake project (CMAKE_PROJECT_llama.cpp_INCLUDE) when
# llama-cpp-python builds it from source: llama-cpp-python forces llama.cpp's `common` library on, but its
# Python bindings load only libllama and libggml, and danlu builds no llama.cpp tools that would use it.
# Leaving it out skips 57 of the build's 140 steps (about 45% of its compile time).
set(LLAMA_BUILD_COMMON OFF)
