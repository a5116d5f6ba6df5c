//! One connection type for both engines. The store's SQL is written once,
//! in the dialect the two share, against this type: its methods carry
//! rusqlite's names and parameter types, and a PostgreSQL connection takes
//! the same calls (`?N` placeholders become `$N`, each value is sent as
//! the type PostgreSQL inferred for its parameter, each column comes back
//! as an SQLite value). Decision 0044 says why.

use super::StoreError;
use rusqlite::params;
use rusqlite::types::{FromSql, ToSql, ToSqlOutput, Value, ValueRef};
use std::cell::RefCell;
use std::collections::HashMap;

/// A connection to either engine.
pub enum Connection {
    Lite(rusqlite::Connection),
    Pg(Box<PgConn>),
}

impl From<rusqlite::Connection> for Connection {
    fn from(c: rusqlite::Connection) -> Connection {
        Connection::Lite(c)
    }
}

/// A PostgreSQL connection, its prepared statements, and how to reconnect.
pub struct PgConn {
    config: postgres::Config,
    tls: super::pg::Tls,
    client: RefCell<Option<postgres::Client>>,
    cache: RefCell<HashMap<String, postgres::Statement>>,
}

/// The parameters of one statement: `params![...]`, or an array of
/// values of one type. Lent as a slice, without an allocation: the writer
/// runs several statements per request.
pub trait Args {
    fn with<R>(&self, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R;
}

impl Args for &[&dyn ToSql] {
    fn with<R>(&self, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R {
        f(self)
    }
}

impl<const N: usize> Args for &[&dyn ToSql; N] {
    fn with<R>(&self, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R {
        f(&self[..])
    }
}

impl<T: ToSql, const N: usize> Args for [T; N] {
    fn with<R>(&self, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R {
        let refs: [&dyn ToSql; N] = std::array::from_fn(|i| &self[i] as &dyn ToSql);
        f(&refs)
    }
}

/// `Option` for a query that may find no row.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>, StoreError>;
}

impl<T> OptionalExtension<T> for Result<T, StoreError> {
    fn optional(self) -> Result<Option<T>, StoreError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code == super::error::NO_ROWS => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A column's position (by number only: the store names no columns).
pub trait ColIndex {
    fn index(self) -> usize;
}

impl ColIndex for usize {
    fn index(self) -> usize {
        self
    }
}

/// One result row of either engine.
pub enum Row<'a> {
    Lite(&'a rusqlite::Row<'a>),
    Pg(&'a [Value]),
}

impl Row<'_> {
    /// Column `i` as `T`, converted as SQLite converts it.
    pub fn get<I: ColIndex, T: FromSql>(&self, i: I) -> rusqlite::Result<T> {
        let i = i.index();
        match self {
            Row::Lite(r) => r.get(i),
            Row::Pg(values) => {
                let v = values
                    .get(i)
                    .ok_or(rusqlite::Error::InvalidColumnIndex(i))?;
                T::column_result(ValueRef::from(v)).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e))
                })
            }
        }
    }
}

impl Connection {
    /// Connects to PostgreSQL (`postgres://...`, several hosts allowed).
    pub fn pg(url: &str, tls: &super::pg::Tls) -> Result<Connection, String> {
        let conn = PgConn {
            config: tls.config(url)?,
            tls: tls.clone(),
            client: RefCell::new(None),
            cache: RefCell::default(),
        };
        conn.client().map_err(|e| e.message)?;
        Ok(Connection::Pg(Box::new(conn)))
    }

    pub fn is_pg(&self) -> bool {
        matches!(self, Connection::Pg(_))
    }

    /// The engine's spelling of `sql`: `lite` on SQLite, `pg` on PostgreSQL.
    pub fn dialect<'s>(&self, lite: &'s str, pg: &'s str) -> &'s str {
        if self.is_pg() {
            pg
        } else {
            lite
        }
    }

    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>, StoreError> {
        Ok(match self {
            Connection::Lite(c) => Statement::Lite(c.prepare_cached(sql)?),
            Connection::Pg(p) => Statement::Pg(p, p.prepare(sql)?),
        })
    }

    pub fn execute(&self, sql: &str, args: impl Args) -> Result<usize, StoreError> {
        self.prepare_cached(sql)?.execute(args)
    }

    pub fn query_row<T, F>(&self, sql: &str, args: impl Args, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Row) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(args, f)
    }

    /// Runs statements without parameters, `;`-separated.
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Connection::Lite(c) => Ok(c.execute_batch(sql)?),
            Connection::Pg(p) => p.with(|c| c.batch_execute(sql)),
        }
    }

    /// The id the last INSERT into a table with an identity gave its row.
    pub fn last_insert_rowid(&self) -> Result<i64, StoreError> {
        match self {
            Connection::Lite(c) => Ok(c.last_insert_rowid()),
            Connection::Pg(_) => self.query_row("SELECT lastval()", params![], |r| r.get(0)),
        }
    }

    /// The SQLite connection (backup, checkpoints, pragmas).
    pub fn lite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Connection::Lite(c) => Some(c),
            Connection::Pg(_) => None,
        }
    }
}

/// A prepared statement of either engine.
pub enum Statement<'c> {
    Lite(rusqlite::CachedStatement<'c>),
    Pg(&'c PgConn, postgres::Statement),
}

impl Statement<'_> {
    pub fn execute(&mut self, args: impl Args) -> Result<usize, StoreError> {
        match self {
            Statement::Lite(s) => Ok(args.with(|a| s.execute(a))?),
            Statement::Pg(p, s) => {
                let values = args.with(pg_args)?;
                let n = p.with(|c| c.execute(&*s, &refs(&values)))?;
                Ok(n as usize)
            }
        }
    }

    /// Every row, mapped (read whole: a query that wants fewer says
    /// `LIMIT`).
    pub fn query_map<T, F>(
        &mut self,
        args: impl Args,
        mut f: F,
    ) -> Result<std::vec::IntoIter<rusqlite::Result<T>>, StoreError>
    where
        F: FnMut(&Row) -> rusqlite::Result<T>,
    {
        match self {
            Statement::Lite(s) => {
                let rows = args.with(|a| {
                    s.query_map(a, |r| f(&Row::Lite(r)))
                        .map(|rows| rows.collect::<Vec<_>>())
                })?;
                Ok(rows.into_iter())
            }
            Statement::Pg(p, s) => {
                let rows = args.with(|a| p.query(s, a))?;
                Ok(rows
                    .iter()
                    .map(|r| f(&Row::Pg(r)))
                    .collect::<Vec<_>>()
                    .into_iter())
            }
        }
    }

    pub fn query_row<T, F>(&mut self, args: impl Args, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Row) -> rusqlite::Result<T>,
    {
        match self {
            Statement::Lite(s) => Ok(args.with(|a| s.query_row(a, |r| f(&Row::Lite(r))))?),
            Statement::Pg(p, s) => {
                let rows = args.with(|a| p.query(s, a))?;
                let first = rows.first().ok_or_else(StoreError::no_rows)?;
                Ok(f(&Row::Pg(first))?)
            }
        }
    }
}

/// The client says goodbye to the server as it is dropped, blocking: off
/// the async runtime's threads, where blocking panics.
impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(client) = self.client.get_mut().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(client));
            }
        }
    }
}

impl PgConn {
    /// The live client, connecting first when there is none (the server
    /// restarted, or a failover moved the primary).
    fn client(&self) -> Result<std::cell::RefMut<'_, postgres::Client>, StoreError> {
        let mut slot = self.client.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            self.cache.borrow_mut().clear();
            *slot = Some(self.tls.connect(&self.config).map_err(StoreError::from)?);
        }
        Ok(std::cell::RefMut::map(slot, |c| {
            c.as_mut().expect("connected just above")
        }))
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<R, postgres::Error>,
    ) -> Result<R, StoreError> {
        let mut client = self.client()?;
        f(&mut client).map_err(StoreError::from)
    }

    fn prepare(&self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.cache.borrow().get(sql) {
            return Ok(s.clone());
        }
        let s = self.with(|c| c.prepare(&to_pg(sql)))?;
        self.cache.borrow_mut().insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn query(
        &self,
        s: &postgres::Statement,
        args: &[&dyn ToSql],
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let values = pg_args(args)?;
        let rows = self.with(|c| c.query(s, &refs(&values)))?;
        rows.iter().map(pg_row).collect()
    }
}

/// The store's SQL as PostgreSQL takes it: `$N` placeholders, and no
/// `INDEXED BY` hints (PostgreSQL plans by itself).
fn to_pg(sql: &str) -> String {
    let mut out = placeholders(sql);
    while let Some(at) = out.find("INDEXED BY ") {
        let rest = &out[at + "INDEXED BY ".len()..];
        let name = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out.replace_range(at..at + "INDEXED BY ".len() + name, "");
    }
    out
}

/// `?N` (and a bare `?`) as PostgreSQL's `$N`, outside quoted text.
fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let (mut quote, mut next) = (None, 0u32);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if q == c => quote = None,
            (None, '?') => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                // A bare `?` takes the number after the largest so far, as
                // in SQLite.
                if n.is_empty() {
                    n = (next + 1).to_string();
                }
                next = next.max(n.parse().unwrap_or(0));
                out.push('$');
                out.push_str(&n);
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// A value sent as whatever type PostgreSQL inferred for its parameter.
#[derive(Debug)]
struct PgArg(Value);

fn pg_args(args: &[&dyn ToSql]) -> Result<Vec<PgArg>, StoreError> {
    args.iter()
        .map(|a| {
            let v = match a.to_sql()? {
                ToSqlOutput::Borrowed(r) => Value::from(r),
                ToSqlOutput::Owned(v) => v,
                other => {
                    return Err(StoreError::internal(format!(
                        "a parameter PostgreSQL cannot take: {other:?}"
                    )))
                }
            };
            Ok(PgArg(v))
        })
        .collect()
}

fn refs(values: &[PgArg]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

impl postgres::types::ToSql for PgArg {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{ToSql as PgToSql, Type};
        match (&self.0, ty) {
            (Value::Null, _) => Ok(postgres::types::IsNull::Yes),
            (Value::Integer(i), &Type::INT8) => PgToSql::to_sql(&i, ty, out),
            (Value::Integer(i), &Type::INT4) => PgToSql::to_sql(&i32::try_from(*i)?, ty, out),
            (Value::Integer(i), &Type::INT2) => PgToSql::to_sql(&i16::try_from(*i)?, ty, out),
            (Value::Integer(i), &Type::BOOL) => PgToSql::to_sql(&(*i != 0), ty, out),
            (Value::Integer(i), &Type::FLOAT8) => PgToSql::to_sql(&(*i as f64), ty, out),
            (Value::Integer(i), _) => PgToSql::to_sql(&i.to_string(), &Type::TEXT, out),
            (Value::Real(f), &Type::FLOAT4) => PgToSql::to_sql(&(*f as f32), ty, out),
            (Value::Real(f), _) => PgToSql::to_sql(&f, &Type::FLOAT8, out),
            (Value::Text(s), &Type::INT8) => PgToSql::to_sql(&s.parse::<i64>()?, ty, out),
            (Value::Text(s), _) => PgToSql::to_sql(&s, &Type::TEXT, out),
            (Value::Blob(b), _) => PgToSql::to_sql(&b, &Type::BYTEA, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A column of any type, as its raw bytes.
struct Raw(Option<Vec<u8>>);

impl<'a> postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(
        _: &postgres::types::Type,
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

/// A PostgreSQL row as SQLite values.
fn pg_row(row: &postgres::Row) -> Result<Vec<Value>, StoreError> {
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_().clone();
            let raw: Raw = row.try_get(i).map_err(StoreError::from)?;
            let Some(raw) = raw.0 else {
                return Ok(Value::Null);
            };
            pg_value(&ty, &raw).map_err(|e| {
                StoreError::internal(format!("reading a {ty} column from PostgreSQL: {e}"))
            })
        })
        .collect()
}

fn pg_value(
    ty: &postgres::types::Type,
    raw: &[u8],
) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
    use postgres::types::{FromSql as F, Type};
    Ok(match *ty {
        Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
        Type::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
        Type::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
        Type::BOOL => Value::Integer(bool::from_sql(ty, raw)?.into()),
        Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
        Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
        Type::NUMERIC => numeric(raw)?,
        Type::BYTEA => Value::Blob(raw.to_vec()),
        Type::JSON => Value::Text(String::from_utf8(raw.to_vec())?),
        Type::JSONB => Value::Text(String::from_utf8(raw.get(1..).unwrap_or(&[]).to_vec())?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            Value::Text(String::from_utf8(raw.to_vec())?)
        }
        _ => return Err(format!("no SQLite value for type {ty}").into()),
    })
}

/// A NUMERIC (what `sum` of BIGINTs gives) in PostgreSQL's binary form:
/// digit count, weight, sign, scale, then base-10,000 digits. An integer
/// when its scale is 0, else a real.
fn numeric(raw: &[u8]) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, String> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "a truncated NUMERIC".to_string())
    };
    let (digits, weight, sign, scale) = (word(0)?, word(1)? as i16, word(2)?, word(3)?);
    if sign == 0xC000 {
        return Err("a NaN NUMERIC".into());
    }
    let mut v = 0f64;
    for i in 0..digits as usize {
        v += f64::from(word(4 + i)?) * 10_000f64.powi(i32::from(weight) - i as i32);
    }
    if sign == 0x4000 {
        v = -v;
    }
    Ok(match scale {
        0 if v.abs() < 9.0e15 => Value::Integer(v as i64),
        _ => Value::Real(v),
    })
}

#[cfg(test)]
mod tests {
    use super::{numeric, placeholders, to_pg};
    use rusqlite::types::Value;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            placeholders("SELECT ?1, '?2', \"a?\" FROM t WHERE x = ?12 AND y = ?"),
            "SELECT $1, '?2', \"a?\" FROM t WHERE x = $12 AND y = $13"
        );
        assert_eq!(
            to_pg("SELECT 1 FROM jobs INDEXED BY jobs_queue WHERE id = ?1"),
            "SELECT 1 FROM jobs  WHERE id = $1"
        );
    }

    /// NUMERIC's binary form: 12,345,678 is the base-10,000 digits 1234
    /// and 5678 with weight 1; -1.5 is 1 and 5000 with weight 0, scale 1.
    #[test]
    fn numerics_read_as_sqlite_values() {
        let words = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            numeric(&words(&[2, 1, 0, 0, 1234, 5678])).unwrap(),
            Value::Integer(12_345_678)
        );
        assert_eq!(
            numeric(&words(&[2, 0, 0x4000, 1, 1, 5000])).unwrap(),
            Value::Real(-1.5)
        );
        assert_eq!(numeric(&words(&[0, 0, 0, 0])).unwrap(), Value::Integer(0));
        assert!(numeric(&words(&[0, 0, 0xC000, 0])).is_err());
        assert!(numeric(&[0, 1]).is_err());
    }
}
