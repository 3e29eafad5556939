//! numpy arrays in and out: checked for type, dtype, shape and layout, then read or written in
//! place. Inputs that are not contiguous are copied once; outputs must be contiguous, as a copy
//! would never reach the caller.

use std::borrow::Cow;

use numpy::{Element, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors;

/// `obj` as an array of `T` (`dtype` names it in messages), borrowed for reading.
fn typed<'py, T: Element>(obj: &Bound<'py, PyAny>, what: &str, dtype: &str, hint: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let py = obj.py();
    let Ok(array) = obj.cast::<PyUntypedArray>() else {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        return Err(errors::argument(py, format!("{what} must be a numpy.ndarray of {dtype}, not {ty}")));
    };
    if !array.dtype().is_equiv_to(&numpy::dtype::<T>(py)) {
        return Err(errors::argument(py, format!("{what} has dtype {}; it must be {dtype}{hint}", array.dtype())));
    }
    let typed = obj.cast::<PyArrayDyn<T>>().map_err(|e| errors::argument(py, format!("{what}: {e}")))?;
    typed.try_readonly().map_err(|e| errors::argument(py, format!("{what} is being written by another call: {e}")))
}

/// A one-dimensional uint64 array of keys.
pub fn keys<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, u64>> {
    let hint = " (ids.astype(numpy.uint64), or ids.view(numpy.uint64) for non-negative int64 without a copy)";
    let keys = typed::<u64>(obj, "keys", "uint64", hint)?;
    if keys.ndim() != 1 {
        return Err(errors::argument(obj.py(), format!("keys has shape {:?}; it must be one-dimensional", keys.shape())));
    }
    Ok(keys)
}

/// A float32 array of values for `rows` keys of `dim` components: shape `(rows, dim)`, or flat
/// with `rows * dim` values. `rows` None (a dense range push) takes any whole number of rows.
pub fn values<'py>(obj: &Bound<'py, PyAny>, what: &str, rows: Option<usize>, dim: usize) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let values = typed::<f32>(obj, what, "float32", " (x.astype(numpy.float32))")?;
    let shape = values.shape();
    let fits = match (shape, rows) {
        ([n], Some(rows)) => *n == rows * dim,
        ([n], None) => n % dim == 0,
        ([n, d], Some(rows)) => *n == rows && *d == dim,
        ([_, d], None) => *d == dim,
        _ => false,
    };
    if !fits {
        let want = match rows {
            Some(rows) => format!("({rows}, {dim}) or ({},)", rows * dim),
            None => format!("(n, {dim}) or a multiple of {dim} long"),
        };
        return Err(errors::argument(obj.py(), format!("{what} has shape {shape:?}; the table needs {want}")));
    }
    Ok(values)
}

/// The elements of `array` in order: in place when contiguous, else a copy.
pub fn slice<'a, T: Element + Copy>(array: &'a PyReadonlyArrayDyn<'_, T>) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(array.as_array().iter().copied().collect()),
    }
}

/// The output of a pull of `rows` keys: `out` when given (checked: float32, shape `(rows, dim)`,
/// C-contiguous, writeable), else a new zeroed array.
pub fn out<'py>(py: Python<'py>, out: Option<&Bound<'py, PyAny>>, rows: usize, dim: usize) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let Some(obj) = out else {
        return Ok(PyArray2::zeros(py, [rows, dim], false));
    };
    let Ok(array) = obj.cast::<PyUntypedArray>() else {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        return Err(errors::argument(py, format!("out must be a numpy.ndarray of float32, not {ty}")));
    };
    if !array.dtype().is_equiv_to(&numpy::dtype::<f32>(py)) {
        return Err(errors::argument(py, format!("out has dtype {}; it must be float32", array.dtype())));
    }
    if array.shape() != [rows, dim] {
        return Err(errors::argument(py, format!("out has shape {:?}; the pull needs ({rows}, {dim})", array.shape())));
    }
    if !array.is_c_contiguous() {
        return Err(errors::argument(py, "out is not C-contiguous: the values are written in place, so give a contiguous array"));
    }
    obj.cast::<PyArray2<f32>>().cloned().map_err(|e| errors::argument(py, format!("out: {e}")))
}

/// Runs `f` on `out`'s elements, borrowed for writing (a read-only array, or one another call is
/// using, is refused).
pub fn write_into<R>(out: &Bound<'_, PyArray2<f32>>, f: impl FnOnce(&mut [f32]) -> PyResult<R>) -> PyResult<R> {
    let py = out.py();
    let mut rw = out.try_readwrite().map_err(|e| errors::argument(py, format!("out cannot be written: {e}")))?;
    let slice = rw.as_slice_mut().map_err(|e| errors::argument(py, format!("out: {e}")))?;
    f(slice)
}
