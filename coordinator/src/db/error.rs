//! What the store answers when it refuses or fails: a kind (what the caller
//! can do about it), a stable code, a message and the field at fault. The
//! store knows nothing of HTTP; `error.rs` maps kinds to statuses.

/// What the caller can do about a store error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No such job or worker.
    NotFound,
    /// A value the store will not hold.
    Invalid,
    /// The request contradicts the current state (a stale report, a taken
    /// name, a live worker).
    Conflict,
    /// A bound on what one party may hold was reached.
    Limited,
    /// A credential that was valid and no longer is.
    Revoked,
    /// Not allowed for this caller in this state.
    Forbidden,
    /// The storage cannot take the write now (locked from outside, full,
    /// replaced): the operator's to fix, the client's to retry.
    Unavailable,
    /// A bug or corruption.
    Internal,
}

#[derive(Debug, Clone)]
pub struct StoreError {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl StoreError {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> StoreError {
        self.field = Some(field.into());
        self
    }

    pub fn not_found(message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::NotFound, "not_found", message)
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Invalid, "invalid_field", message).with_field(field)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Conflict, code, message)
    }

    pub fn limited(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Limited, code, message)
    }

    pub fn revoked(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Revoked, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Forbidden, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Unavailable, code, message)
    }

    pub fn internal(message: impl Into<String>) -> StoreError {
        StoreError::new(Kind::Internal, "internal", message)
    }

    /// The database could not be written (locked from outside, disk full).
    pub fn is_storage(&self) -> bool {
        matches!(
            self.code,
            "database_busy" | "storage_full" | "database_unreachable"
        )
    }

    /// A refusal of this one request (the caller's to fix), not a failure
    /// of the store.
    pub fn is_refusal(&self) -> bool {
        !matches!(self.kind, Kind::Unavailable | Kind::Internal)
    }
}

impl StoreError {
    /// The error as the wire shows it (`{"code", "message", "field"}`).
    pub fn detail(&self) -> drover_proto::ErrorDetail {
        drover_proto::ErrorDetail {
            code: self.code.to_string(),
            message: self.message.clone(),
            field: self.field.clone(),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {}

/// SQLite failures: a busy database or a full disk are the operator's to fix
/// and the client's to retry; anything else is a bug or corruption.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode;
        if matches!(e, rusqlite::Error::QueryReturnedNoRows) {
            return StoreError::no_rows();
        }
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
                StoreError::unavailable(
                    "database_busy",
                    "the database is locked by another process; retry shortly",
                )
            }
            Some(ErrorCode::DiskFull) => StoreError::unavailable(
                "storage_full",
                "the disk holding the database is full; free space and retry",
            ),
            _ => StoreError::internal(format!("database error: {e}")),
        }
    }
}

/// The code of "the query found no row" (see `sql::OptionalExtension`).
pub const NO_ROWS: &str = "no_rows";

impl StoreError {
    pub fn no_rows() -> StoreError {
        StoreError::new(Kind::Internal, NO_ROWS, "the query returned no rows")
    }
}

/// PostgreSQL failures: an unreachable or restarting server, a full disk
/// and a lost serialization race are the client's to retry; anything else
/// is a bug.
impl From<postgres::Error> for StoreError {
    fn from(pg: postgres::Error) -> StoreError {
        // "db error" alone says nothing: the server's message says what.
        let e = match pg.as_db_error() {
            Some(db) => format!(
                "{} ({}): {}",
                db.message(),
                db.code().code(),
                db.detail().unwrap_or("")
            ),
            None => pg.to_string(),
        };
        let e = e.trim_end_matches([' ', ':']);
        let state = pg.code().map(|c| c.code().to_string()).unwrap_or_default();
        let io = std::error::Error::source(&pg).is_some_and(|s| s.is::<std::io::Error>());
        if pg.is_closed() || io || state.starts_with("08") || state.starts_with("57P") {
            return StoreError::unavailable(
                "database_unreachable",
                format!("PostgreSQL cannot be reached; retry shortly ({e})"),
            );
        }
        match state.as_str() {
            "53100" => StoreError::unavailable(
                "storage_full",
                "the disk holding PostgreSQL's data is full; free space and retry",
            ),
            "40001" | "40P01" | "55P03" => StoreError::unavailable(
                "database_busy",
                format!("PostgreSQL refused the transaction; retry shortly ({e})"),
            ),
            _ => StoreError::internal(format!("database error: {e}")),
        }
    }
}
