//! emit()'s measurement of the message it will send: the payload's JSON text length, exactly as
//! the worker renders it (`jsonb_out`) and converts it to UTF-8, without rendering the payload.
//!
//! A jsonb value can be tiny in storage and huge as text (`1e131071` is 16 bytes as jsonb and
//! 131 kB as text), so a size estimate from storage is not a bound. This walks the jsonb value
//! token by token, adds up the text each token becomes, renders only numbers (one at a time),
//! and stops as soon as the limit is passed.

use pgrx::pg_sys;

use crate::encoding;

/// Bytes that `payload` (a jsonb datum) takes as JSON text in UTF-8, or `None` as soon as it
/// is known to exceed `limit`. Err: a string the database encoding cannot turn into UTF-8.
///
/// SAFETY: `payload` is a valid, non-NULL jsonb datum.
pub unsafe fn json_text_bytes(
    payload: pg_sys::Datum,
    limit: usize,
) -> Result<Option<usize>, String> {
    // SAFETY: per the contract; the detoasted copy lives in the current memory context.
    let jsonb = unsafe { pg_sys::pg_detoast_datum(payload.cast_mut_ptr()) }.cast::<pg_sys::Jsonb>();
    // SAFETY: `jsonb` is a detoasted jsonb value; the iterator reads it until WJB_DONE.
    let mut iterator = unsafe { pg_sys::JsonbIteratorInit(&raw mut (*jsonb).root) };
    let mut value = pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvNull,
        val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: false },
    };
    let mut total = 0usize;
    // The state of jsonb_out's formatter (JsonbToCStringWorker): whether the next item is the
    // first of its container, and whether the value is a raw scalar (no brackets).
    let mut first = true;
    let mut raw_scalar = false;
    let mut token = next(&mut iterator, &mut value);
    while token != pg_sys::JsonbIteratorToken::WJB_DONE {
        let separator = if first { 0 } else { ", ".len() };
        match token {
            pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY => {
                // SAFETY: a BEGIN_ARRAY token carries an array value.
                raw_scalar = unsafe { value.val.array.rawScalar };
                total += separator + usize::from(!raw_scalar);
                first = true;
            }
            pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT => {
                total += separator + 1;
                first = true;
            }
            pg_sys::JsonbIteratorToken::WJB_KEY => {
                // SAFETY: a KEY token carries a string value.
                total += separator + unsafe { scalar_bytes(&value)? } + ": ".len();
                token = next(&mut iterator, &mut value);
                if token == pg_sys::JsonbIteratorToken::WJB_VALUE {
                    // SAFETY: a VALUE token carries a scalar.
                    total += unsafe { scalar_bytes(&value)? };
                    first = false;
                } else {
                    // A nested object or array: handled as the next token, with no separator.
                    first = true;
                    continue;
                }
            }
            pg_sys::JsonbIteratorToken::WJB_ELEM => {
                // SAFETY: an ELEM token carries a scalar.
                total += separator + unsafe { scalar_bytes(&value)? };
                first = false;
            }
            pg_sys::JsonbIteratorToken::WJB_END_ARRAY => {
                total += usize::from(!raw_scalar);
                first = false;
            }
            pg_sys::JsonbIteratorToken::WJB_END_OBJECT => {
                total += 1;
                first = false;
            }
            _ => {}
        }
        if total > limit {
            return Ok(None);
        }
        token = next(&mut iterator, &mut value);
    }
    Ok(Some(total))
}

fn next(iterator: &mut *mut pg_sys::JsonbIterator, value: &mut pg_sys::JsonbValue) -> u32 {
    // SAFETY: the iterator was initialised on a valid container and is advanced until DONE.
    unsafe { pg_sys::JsonbIteratorNext(iterator, value, false) }
}

/// The text one scalar becomes: `null`, `true`/`false`, a number as `numeric_out` writes it, or
/// a string quoted and escaped as `escape_json` does, in UTF-8.
///
/// SAFETY: `value` is a scalar the iterator returned.
unsafe fn scalar_bytes(value: &pg_sys::JsonbValue) -> Result<usize, String> {
    Ok(match value.type_ {
        pg_sys::jbvType::jbvNull => "null".len(),
        // SAFETY: the type tag says which union member is set.
        pg_sys::jbvType::jbvBool if unsafe { value.val.boolean } => "true".len(),
        pg_sys::jbvType::jbvBool => "false".len(),
        pg_sys::jbvType::jbvNumeric => unsafe {
            // SAFETY: numeric_out renders a valid numeric as a palloc'd C string, freed here.
            let text = pgrx::direct_function_call_as_datum(
                pg_sys::numeric_out,
                &[Some(pg_sys::Datum::from(value.val.numeric))],
            )
            .expect("numeric_out returns text")
            .cast_mut_ptr::<std::ffi::c_char>();
            let len = std::ffi::CStr::from_ptr(text).to_bytes().len();
            pg_sys::pfree(text.cast());
            len
        },
        pg_sys::jbvType::jbvString => {
            // SAFETY: a string value points at `len` bytes inside the jsonb.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    value.val.string.val.cast::<u8>(),
                    value.val.string.len as usize,
                )
            };
            escaped_string_bytes(bytes)?
        }
        _ => 0,
    })
}

/// `escape_json`'s output length for `bytes`: quotes, two-character escapes for \b \f \n \r \t
/// \" \\, `\u00XX` for other control characters, and every other character as itself (in UTF-8).
fn escaped_string_bytes(bytes: &[u8]) -> Result<usize, String> {
    let mut ascii = 0;
    let mut non_ascii = false;
    for &byte in bytes {
        ascii += match byte {
            b'\x08' | b'\x0c' | b'\n' | b'\r' | b'\t' | b'"' | b'\\' => 2,
            0..=0x1f => 6,
            0x20..=0x7f => 1,
            _ => {
                non_ascii = true;
                0
            }
        };
    }
    let rest = if non_ascii {
        let non_ascii_bytes = bytes.iter().filter(|b| !b.is_ascii()).count();
        let ascii_bytes = bytes.len() - non_ascii_bytes;
        encoding::utf8_len(bytes)? - ascii_bytes
    } else {
        0
    };
    Ok(2 + ascii + rest)
}

/// The size of a headers object as sent: every key and every string value in UTF-8 (values that
/// are not strings are refused by the worker, which cannot send them).
///
/// SAFETY: `headers` is a valid, non-NULL jsonb datum.
pub unsafe fn string_object_bytes(headers: pg_sys::Datum) -> Result<usize, String> {
    // SAFETY: per the contract; the detoasted copy lives in the current memory context.
    let jsonb = unsafe { pg_sys::pg_detoast_datum(headers.cast_mut_ptr()) }.cast::<pg_sys::Jsonb>();
    // SAFETY: `jsonb` is a detoasted jsonb value; the iterator reads it until WJB_DONE.
    let mut iterator = unsafe { pg_sys::JsonbIteratorInit(&raw mut (*jsonb).root) };
    let mut value = pg_sys::JsonbValue {
        type_: pg_sys::jbvType::jbvNull,
        val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: false },
    };
    let mut total = 0;
    let mut depth = 0;
    loop {
        let token = next(&mut iterator, &mut value);
        match token {
            pg_sys::JsonbIteratorToken::WJB_DONE => return Ok(total),
            pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT
            | pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY => depth += 1,
            pg_sys::JsonbIteratorToken::WJB_END_OBJECT
            | pg_sys::JsonbIteratorToken::WJB_END_ARRAY => depth -= 1,
            pg_sys::JsonbIteratorToken::WJB_KEY | pg_sys::JsonbIteratorToken::WJB_VALUE
                if depth == 1 && value.type_ == pg_sys::jbvType::jbvString =>
            {
                // SAFETY: a string value points at `len` bytes inside the jsonb.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        value.val.string.val.cast::<u8>(),
                        value.val.string.len as usize,
                    )
                };
                total += encoding::utf8_len(bytes)?;
            }
            _ => {}
        }
    }
}
