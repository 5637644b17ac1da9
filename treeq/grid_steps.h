// Grid.quantize's and Grid.dequantize's fp32 steps (treeq/numerics.py) for the native loops that
// repeat them bit for bit: clip_error.cpp and methods/gptq_columns.cpp, each tested against torch.
// Their builds keep every step unfused (-ffp-contract=off), as torch computes them.
#pragma once

#include <cmath>

// A weight's code: clamp(nearbyint(w / scale - offset) + zero, lo, hi), the minimum applied first
// and then the maximum, as torch.clamp does.
inline float grid_code(float w, float scale, float zero, float offset, float lo, float hi) {
    float q = std::nearbyint(w / scale - offset) + zero;
    q = q < lo ? lo : q;
    return q > hi ? hi : q;
}

// A code's value: ((q - zero) + offset) * scale.
inline float grid_value(float q, float scale, float zero, float offset) { return ((q - zero) + offset) * scale; }
