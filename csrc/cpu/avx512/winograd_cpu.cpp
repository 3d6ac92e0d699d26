// The AVX-512 variant of ../winograd_cpu.cpp: setup.py compiles csrc/cpu/avx512/*.cpp with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -DCPU_CAPABILITY=AVX512, which puts the code in
// resnet_fast::avx512 and gives it 16-lane vectors (cpu_isa.h).
#include "../winograd_cpu.cpp"
