//! placeholder: updaters
