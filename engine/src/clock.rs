//! placeholder: vector-clock range stamps
