//! Text between the database's encoding and UTF-8. Kafka messages are always UTF-8; the database
//! may be LATIN1, WIN1252, SQL_ASCII or any other server encoding.

use std::borrow::Cow;

use pgrx::pg_sys;
use pgrx::PgTryBuilder;

/// The database's encoding, as Postgres numbers it.
fn database_encoding() -> i32 {
    // SAFETY: a plain read of the backend's encoding, set at connection.
    unsafe { pg_sys::GetDatabaseEncoding() }
}

/// `bytes` (in the database's encoding) as UTF-8. In SQL_ASCII, which stores bytes unchecked,
/// the bytes must already be UTF-8.
pub fn to_utf8(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    let encoding = database_encoding();
    if encoding == pg_sys::pg_enc::PG_UTF8 as i32
        || encoding == pg_sys::pg_enc::PG_SQL_ASCII as i32
        || bytes.is_ascii()
    {
        return std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|e| format!("the text is not valid UTF-8 ({e})"));
    }
    convert(bytes, encoding).map(Cow::Owned)
}

/// How many bytes `bytes` (in the database's encoding) take in UTF-8.
pub fn utf8_len(bytes: &[u8]) -> Result<usize, String> {
    if bytes.is_ascii() {
        return Ok(bytes.len());
    }
    to_utf8(bytes).map(|text| text.len())
}

/// Converts with Postgres' own conversion functions; a byte sequence the encoding does not map
/// to UTF-8 is an error, not a crash.
fn convert(bytes: &[u8], encoding: i32) -> Result<String, String> {
    PgTryBuilder::new(|| {
        // SAFETY: the conversion reads `len` bytes from `bytes` and returns either that same
        // pointer (nothing to convert) or a palloc'd NUL-terminated string; it raises an ERROR
        // for unconvertible input, which the surrounding try turns into Err.
        unsafe {
            let converted = pg_sys::pg_do_encoding_conversion(
                bytes.as_ptr().cast_mut(),
                bytes.len() as i32,
                encoding,
                pg_sys::pg_enc::PG_UTF8 as i32,
            );
            let text = if converted.cast_const() == bytes.as_ptr() {
                bytes.to_vec()
            } else {
                let text = std::ffi::CStr::from_ptr(converted.cast())
                    .to_bytes()
                    .to_vec();
                pg_sys::pfree(converted.cast());
                text
            };
            String::from_utf8(text).map_err(|e| e.to_string())
        }
    })
    .catch_others(|error| {
        Err(match error {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report) => report.message().to_string(),
            _ => "the text cannot be converted to UTF-8".to_string(),
        })
    })
    .execute()
}

/// `text` made safe to store in the database: unchanged in UTF-8, else with every non-ASCII
/// character escaped (for error messages that go into outbox.parked).
pub fn for_database(text: &str) -> Cow<'_, str> {
    let encoding = database_encoding();
    if encoding == pg_sys::pg_enc::PG_UTF8 as i32 || text.is_ascii() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.escape_default().to_string())
    }
}
