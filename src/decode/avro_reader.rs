//! Reading Avro datums (the binary encoding, without the wire format's
//! header) into apache-avro [`Value`]s, as apache-avro's own reader does,
//! with one difference that matters for speed: a Debezium envelope is read
//! with the fields the apply never looks at skipped, not built.
//!
//! Why: in a profile of an Avro replay, apache-avro's reader was the largest
//! single share of the worker's CPU. It allocates a name for every field of
//! every record it reads (a Debezium `source` block alone has 16) and a
//! zeroed buffer for every string, and it builds the whole envelope
//! although the apply reads 4 of its 8 fields and 6 of `source`'s 16.
//!
//! The values it builds are the ones apache-avro builds (the tests compare
//! both on random data of every kind of schema), so `decode` treats them
//! alike; a `uuid` or `big-decimal` (which Debezium does not write) is one
//! leaf read by apache-avro's decoder, never a whole datum, whose reader
//! recurses without a bound. Unlike apache-avro, a datum cut short is
//! always an error, never a value.
//!
//! Bounded input: a datum comes from whoever can write to a topic and its
//! schema from whoever can register one, so reading one may neither
//! recurse without bound nor build without bound.
//! - [`MAX_DEPTH`]: a recursive schema (a record holding itself through a
//!   union) lets a datum nest as deep as its bytes allow, one stack frame
//!   per level; deeper than this is refused.
//! - [`budget`]: an item can take no bytes (a null, an empty record), so a
//!   datum's length alone does not bound how many values it makes; every
//!   value read (built or skipped) is charged its memory, and a datum may
//!   spend [`BUDGET_BASE`] + [`BUDGET_PER_BYTE`] per byte of itself.
//!
//! Both refusals are [`ReadError::Limit`]: the message is bad data and is
//! dead-lettered (`avro_limit`), naming the limit.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{InnerDecimalSchema, Name, RecordSchema, UnionSchema, UuidSchema};
use apache_avro::types::Value;
use apache_avro::{Decimal, Duration, Schema};

/// The envelope fields the apply reads (`decode::avro_envelope`).
const ENVELOPE_FIELDS: &[&str] = &["op", "source", "before", "after"];
/// The `source` fields the apply reads.
const SOURCE_FIELDS: &[&str] = &["ts_ms", "lsn", "schema", "table", "origin", "snapshot"];

/// How deep values may nest in one datum; every value is a level below the
/// one holding it. A Debezium envelope needs 7 (envelope, image union, row,
/// column union, array, item union, item).
pub const MAX_DEPTH: usize = 64;

/// Memory every datum may spend on values whatever its length.
pub const BUDGET_BASE: usize = 1 << 20;
/// …and per byte of the datum: about what real data can build from one
/// byte (a null item of a nullable array, one byte, is two values of 48
/// bytes), so only items of no bytes, or next to none, reach it.
pub const BUDGET_PER_BYTE: usize = 128;

/// The memory budget of a datum of `len` bytes.
pub fn budget(len: usize) -> usize {
    BUDGET_BASE.saturating_add(len.saturating_mul(BUDGET_PER_BYTE))
}

/// Why a datum could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The bytes are not a datum of the schema.
    Datum(String),
    /// The datum is beyond a bound of the reader ([`MAX_DEPTH`], [`budget`]).
    Limit(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Datum(e) | ReadError::Limit(e) => f.write_str(e),
        }
    }
}

impl From<String> for ReadError {
    fn from(e: String) -> Self {
        ReadError::Datum(e)
    }
}

impl From<&str> for ReadError {
    fn from(e: &str) -> Self {
        ReadError::Datum(e.to_string())
    }
}

impl ReadError {
    fn at(self, byte: usize) -> ReadError {
        match self {
            ReadError::Datum(e) => ReadError::Datum(format!("{e} at byte {byte}")),
            ReadError::Limit(e) => ReadError::Limit(format!("{e} at byte {byte}")),
        }
    }
}

/// One writer schema with its named types resolved, ready to read datums.
/// Owns its schema (no `'static` borrow), so a plan dropped from a cache
/// frees it.
pub struct Plan {
    schema: Arc<Schema>,
    /// Named types by full name, as apache-avro resolves `Ref`s (copies of
    /// the named parts of `schema`).
    names: HashMap<Name, Schema>,
}

/// Which fields of a record to build.
#[derive(Clone, Copy)]
enum Fields {
    All,
    /// The envelope: its own listed fields, and `source`'s listed ones.
    Envelope,
    Source,
}

impl Fields {
    fn keeps(self, name: &str) -> bool {
        match self {
            Fields::All => true,
            Fields::Envelope => ENVELOPE_FIELDS.contains(&name),
            Fields::Source => SOURCE_FIELDS.contains(&name),
        }
    }

    /// How to read a kept field's value.
    fn inner(self, name: &str) -> Fields {
        match (self, name) {
            (Fields::Envelope, "source") => Fields::Source,
            _ => Fields::All,
        }
    }
}

impl Plan {
    pub fn new(schema: Arc<Schema>) -> Plan {
        let mut names = HashMap::new();
        collect_names(&schema, None, &mut names);
        Plan { schema, names }
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// The whole datum, as apache-avro reads it.
    pub fn read(&self, datum: &[u8]) -> Result<Value, ReadError> {
        self.read_with(datum, Fields::All)
    }

    /// A Debezium envelope, with only the fields the apply reads. Any other
    /// datum (a record without those fields, a key) comes out whole except
    /// for the fields an envelope would not keep.
    pub fn read_envelope(&self, datum: &[u8]) -> Result<Value, ReadError> {
        self.read_with(datum, Fields::Envelope)
    }

    fn reader<'d>(&self, datum: &'d [u8]) -> Reader<'d, '_> {
        Reader {
            buf: datum,
            len: datum.len(),
            names: &self.names,
            depth: 0,
            spent: 0,
            budget: budget(datum.len()),
        }
    }

    fn read_with(&self, datum: &[u8], fields: Fields) -> Result<Value, ReadError> {
        let mut reader = self.reader(datum);
        reader
            .value(&self.schema, None, fields)
            .map_err(|e| e.at(reader.len - reader.buf.len()))
    }
}

/// Named types by full name, as apache-avro resolves `Ref`s.
fn collect_names(schema: &Schema, enclosing: Option<&str>, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(RecordSchema { name, fields, .. }) => {
            let full = name.fully_qualified_name(enclosing).into_owned();
            let namespace = full.namespace().map(str::to_string);
            names.insert(full, schema.clone());
            for f in fields {
                collect_names(&f.schema, namespace.as_deref(), names);
            }
        }
        Schema::Enum(e) => {
            names.insert(
                e.name.fully_qualified_name(enclosing).into_owned(),
                schema.clone(),
            );
        }
        Schema::Fixed(f) | Schema::Duration(f) | Schema::Uuid(UuidSchema::Fixed(f)) => {
            names.insert(
                f.name.fully_qualified_name(enclosing).into_owned(),
                schema.clone(),
            );
        }
        Schema::Decimal(d) => {
            if let InnerDecimalSchema::Fixed(f) = &d.inner {
                names.insert(
                    f.name.fully_qualified_name(enclosing).into_owned(),
                    schema.clone(),
                );
            }
        }
        Schema::Array(a) => collect_names(&a.items, enclosing, names),
        Schema::Map(m) => collect_names(&m.types, enclosing, names),
        Schema::Union(u) => {
            for v in u.variants() {
                collect_names(v, enclosing, names);
            }
        }
        _ => {}
    }
}

/// A length as the datum writes it (a long), which must not be negative.
fn length(v: i64) -> Result<usize, ReadError> {
    usize::try_from(v).map_err(|_| format!("negative length {v}").into())
}

/// A block's item count as a number of items to read one by one (each is
/// charged to the budget as it is read).
fn items(n: u64) -> Result<usize, ReadError> {
    usize::try_from(n).map_err(|_| format!("a block of {n} items").into())
}

/// What building one value costs the budget.
const VALUE_COST: usize = size_of::<Value>();
/// …and one record field or map entry beside its value (its name).
const ENTRY_COST: usize = size_of::<String>();

struct Reader<'d, 'n> {
    buf: &'d [u8],
    len: usize,
    names: &'n HashMap<Name, Schema>,
    /// Values being read, outermost first (the recursion's depth).
    depth: usize,
    /// Memory charged so far, against `budget`.
    spent: usize,
    budget: usize,
}

impl<'d, 'n> Reader<'d, 'n> {
    fn take(&mut self, n: usize) -> Result<&'d [u8], ReadError> {
        if n > self.buf.len() {
            return Err(format!("the datum ends {} bytes short", n - self.buf.len()).into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// One more nesting level, within [`MAX_DEPTH`].
    fn descend(&mut self) -> Result<(), ReadError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ReadError::Limit(format!(
                "values nested deeper than {MAX_DEPTH} levels (the Avro reader's depth limit)"
            )));
        }
        Ok(())
    }

    /// Charges `bytes` of memory to the datum's budget.
    fn charge(&mut self, bytes: usize) -> Result<(), ReadError> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.budget {
            return Err(ReadError::Limit(format!(
                "values beyond the item-memory budget of {} bytes for a datum of {} bytes \
                 ({BUDGET_BASE} + {BUDGET_PER_BYTE} per byte: too many items that take no bytes)",
                self.budget, self.len
            )));
        }
        Ok(())
    }

    /// A zig-zag varint of at most 10 bytes.
    fn long(&mut self) -> Result<i64, ReadError> {
        let mut raw: u64 = 0;
        for i in 0..10 {
            let [byte, rest @ ..] = self.buf else {
                return Err("the datum ends inside a number".into());
            };
            self.buf = rest;
            raw |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err("a number longer than 10 bytes".into())
    }

    fn int(&mut self) -> Result<i32, ReadError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| format!("{v} does not fit an int").into())
    }

    fn len(&mut self) -> Result<usize, ReadError> {
        let v = self.long()?;
        length(v)
    }

    fn bytes(&mut self) -> Result<&'d [u8], ReadError> {
        let n = self.len()?;
        self.take(n)
    }

    /// Bytes to be copied into a value: charged.
    fn owned_bytes(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        let bytes = self.take(n)?;
        self.charge(bytes.len())?;
        Ok(bytes.to_vec())
    }

    fn string(&mut self) -> Result<String, ReadError> {
        let bytes = self.bytes()?;
        self.charge(bytes.len())?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|e| format!("a string that is not UTF-8: {e}").into())
    }

    /// The header of the next block of an array or map: its item count (0:
    /// the end) and, where the count is written negative, the block's size
    /// in bytes that follows it.
    fn block_header(&mut self) -> Result<(u64, Option<i64>), ReadError> {
        let count = self.long()?;
        if count < 0 {
            Ok((count.unsigned_abs(), Some(self.long()?)))
        } else {
            Ok((count as u64, None))
        }
    }

    /// The item count of the next block, to be read item by item (0: the
    /// end).
    fn block(&mut self) -> Result<usize, ReadError> {
        let (n, _) = self.block_header()?;
        items(n)
    }

    /// Moves past an array's or map's blocks, skipping each item with
    /// `skip_item`; a block that says its size is skipped whole.
    fn skip_blocks(
        &mut self,
        mut skip_item: impl FnMut(&mut Self) -> Result<(), ReadError>,
    ) -> Result<(), ReadError> {
        loop {
            let (n, size) = self.block_header()?;
            if let Some(size) = size {
                let size = length(size)?;
                self.take(size)?;
                continue;
            }
            if n == 0 {
                return Ok(());
            }
            for _ in 0..items(n)? {
                skip_item(self)?;
            }
        }
    }

    /// A union's branch: its index and schema.
    fn branch<'s>(&mut self, union: &'s UnionSchema) -> Result<(u32, &'s Schema), ReadError> {
        let i = self.long()?;
        match usize::try_from(i)
            .ok()
            .and_then(|i| union.variants().get(i))
        {
            Some(variant) => Ok((i as u32, variant)),
            None => Err(format!("union branch {i} out of range").into()),
        }
    }

    fn resolve(&self, name: &Name, enclosing: Option<&str>) -> Result<&'n Schema, ReadError> {
        let full = name.fully_qualified_name(enclosing);
        self.names.get(&*full).ok_or_else(|| {
            format!("the schema names an undefined type {}", full.fullname(None)).into()
        })
    }

    /// One value, one nesting level deeper, charged to the budget.
    fn value(
        &mut self,
        schema: &Schema,
        enclosing: Option<&str>,
        fields: Fields,
    ) -> Result<Value, ReadError> {
        self.descend()?;
        self.charge(VALUE_COST)?;
        let value = self.build(schema, enclosing, fields)?;
        self.depth -= 1;
        Ok(value)
    }

    fn build(
        &mut self,
        schema: &Schema,
        enclosing: Option<&str>,
        fields: Fields,
    ) -> Result<Value, ReadError> {
        Ok(match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => match self.take(1)?[0] {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                b => return Err(format!("{b} is not a boolean").into()),
            },
            Schema::Int => Value::Int(self.int()?),
            Schema::Long => Value::Long(self.long()?),
            Schema::Float => Value::Float(f32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            Schema::Double => Value::Double(f64::from_le_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            Schema::Bytes => {
                let n = self.len()?;
                Value::Bytes(self.owned_bytes(n)?)
            }
            Schema::String => Value::String(self.string()?),
            Schema::Fixed(f) => Value::Fixed(f.size, self.owned_bytes(f.size)?),
            Schema::Decimal(d) => Value::Decimal(Decimal::from(match &d.inner {
                InnerDecimalSchema::Fixed(f) => self.owned_bytes(f.size)?,
                InnerDecimalSchema::Bytes => {
                    let n = self.len()?;
                    self.owned_bytes(n)?
                }
            })),
            Schema::Duration(f) => {
                if f.size != 12 {
                    return Err(format!("a duration of {} bytes, not 12", f.size).into());
                }
                let bytes: [u8; 12] = self.take(12)?.try_into().expect("12 bytes");
                Value::Duration(Duration::from(bytes))
            }
            Schema::Date => Value::Date(self.int()?),
            Schema::TimeMillis => Value::TimeMillis(self.int()?),
            Schema::TimeMicros => Value::TimeMicros(self.long()?),
            Schema::TimestampMillis => Value::TimestampMillis(self.long()?),
            Schema::TimestampMicros => Value::TimestampMicros(self.long()?),
            Schema::TimestampNanos => Value::TimestampNanos(self.long()?),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(self.long()?),
            Schema::LocalTimestampMicros => Value::LocalTimestampMicros(self.long()?),
            Schema::LocalTimestampNanos => Value::LocalTimestampNanos(self.long()?),
            Schema::Enum(e) => {
                let i = self.int()?;
                match usize::try_from(i).ok().and_then(|i| e.symbols.get(i)) {
                    Some(symbol) => Value::Enum(i as u32, symbol.clone()),
                    None => return Err(format!("enum index {i} out of range").into()),
                }
            }
            Schema::Array(a) => {
                let mut items = Vec::new();
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break Value::Array(items);
                    }
                    // Reserved only as far as the bytes left could fill.
                    items.reserve(n.min(self.buf.len()));
                    for _ in 0..n {
                        items.push(self.value(&a.items, enclosing, Fields::All)?);
                    }
                }
            }
            Schema::Map(m) => {
                let mut items = HashMap::new();
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break Value::Map(items);
                    }
                    for _ in 0..n {
                        self.charge(ENTRY_COST)?;
                        let key = self.string()?;
                        let value = self.value(&m.types, enclosing, Fields::All)?;
                        items.insert(key, value);
                    }
                }
            }
            Schema::Union(u) => {
                let (i, variant) = self.branch(u)?;
                Value::Union(i, Box::new(self.value(variant, enclosing, fields)?))
            }
            Schema::Record(r) => {
                let full = r.name.fully_qualified_name(enclosing);
                let namespace = full.namespace();
                let mut items = Vec::with_capacity(r.fields.len());
                for f in &r.fields {
                    if fields.keeps(&f.name) {
                        self.charge(ENTRY_COST + f.name.len())?;
                        let value = self.value(&f.schema, namespace, fields.inner(&f.name))?;
                        items.push((f.name.clone(), value));
                    } else {
                        self.skip(&f.schema, namespace)?;
                    }
                }
                Value::Record(items)
            }
            // The named type in place of its name: the same value, no level
            // of its own (a name never resolves to another name).
            Schema::Ref { name } => {
                let named = self.resolve(name, enclosing)?;
                return self.build(named, enclosing, fields);
            }
            Schema::Uuid(_) | Schema::BigDecimal => self.leaf_by_apache_avro(schema)?,
        })
    }

    /// A `uuid` or `big-decimal`, as apache-avro reads it: its decoder on
    /// this one leaf (it holds no other value, so nothing recurses).
    fn leaf_by_apache_avro(&mut self, leaf: &Schema) -> Result<Value, ReadError> {
        let mut rest = self.buf;
        let value = GenericDatumReader::builder(leaf)
            .build()
            .and_then(|reader| reader.read_value(&mut rest))
            .map_err(|e| ReadError::Datum(e.to_string()))?;
        self.charge(self.buf.len() - rest.len())?;
        self.buf = rest;
        Ok(value)
    }

    /// Moves past one value without building it: one nesting level deeper,
    /// and charged as if built (the work of skipping items of no bytes is
    /// bounded like their memory).
    fn skip(&mut self, schema: &Schema, enclosing: Option<&str>) -> Result<(), ReadError> {
        self.descend()?;
        self.charge(VALUE_COST)?;
        self.pass(schema, enclosing)?;
        self.depth -= 1;
        Ok(())
    }

    fn pass(&mut self, schema: &Schema, enclosing: Option<&str>) -> Result<(), ReadError> {
        match schema {
            Schema::Null => {}
            Schema::Boolean => {
                self.take(1)?;
            }
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
            | Schema::Enum(_) => {
                self.long()?;
            }
            Schema::Float => {
                self.take(4)?;
            }
            Schema::Double => {
                self.take(8)?;
            }
            Schema::Bytes
            | Schema::String
            | Schema::BigDecimal
            | Schema::Uuid(UuidSchema::Bytes | UuidSchema::String) => {
                self.bytes()?;
            }
            Schema::Fixed(f) | Schema::Duration(f) | Schema::Uuid(UuidSchema::Fixed(f)) => {
                self.take(f.size)?;
            }
            Schema::Decimal(d) => match &d.inner {
                InnerDecimalSchema::Fixed(f) => {
                    self.take(f.size)?;
                }
                InnerDecimalSchema::Bytes => {
                    self.bytes()?;
                }
            },
            Schema::Array(a) => self.skip_blocks(|r| r.skip(&a.items, enclosing))?,
            Schema::Map(m) => self.skip_blocks(|r| {
                r.bytes()?;
                r.skip(&m.types, enclosing)
            })?,
            Schema::Union(u) => {
                let (_, variant) = self.branch(u)?;
                self.skip(variant, enclosing)?;
            }
            Schema::Record(r) => {
                let full = r.name.fully_qualified_name(enclosing);
                let namespace = full.namespace();
                for f in &r.fields {
                    self.skip(&f.schema, namespace)?;
                }
            }
            Schema::Ref { name } => {
                let named = self.resolve(name, enclosing)?;
                self.pass(named, enclosing)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::{Days, Millis, Months};
    use proptest::prelude::*;

    /// Every kind of schema this reader builds, named types by reference
    /// and across namespaces included.
    const ALL_KINDS: &str = r#"{"type": "record", "name": "All", "namespace": "t", "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "by", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "fx", "type": {"type": "fixed", "name": "F3", "size": 3}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "a", "type": {"type": "array", "items": ["null", "long"]}},
        {"name": "m", "type": {"type": "map", "values": "string"}},
        {"name": "dec", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "decf", "type": {"type": "fixed", "name": "D8", "size": 8, "logicalType": "decimal", "precision": 12, "scale": 3}},
        {"name": "date", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tm", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tu", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "tsm", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tsu", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "tsn", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
        {"name": "ltm", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "ltu", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "ltn", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}},
        {"name": "dur", "type": {"type": "fixed", "name": "Dur", "size": 12, "logicalType": "duration"}},
        {"name": "uuid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "uuidf", "type": {"type": "fixed", "name": "U16", "size": 16, "logicalType": "uuid"}},
        {"name": "bigdec", "type": {"type": "bytes", "logicalType": "big-decimal"}},
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "int"}]}},
        {"name": "again", "type": ["null", "Inner"]},
        {"name": "other", "type": {"type": "record", "name": "Other", "namespace": "u", "fields": [
            {"name": "y", "type": "t.E"},
            {"name": "z", "type": {"type": "array", "items": {"type": "map", "values": ["null", "t.Inner"]}}}
        ]}}
    ]}"#;

    fn plan_of(schema: &Schema) -> Plan {
        Plan::new(Arc::new(schema.clone()))
    }

    fn schemas() -> Vec<&'static Schema> {
        [
            ALL_KINDS,
            include_str!("../../schemas/avro/public.users-value.avsc"),
            include_str!("../../schemas/avro/public.users-key.avsc"),
            include_str!("../../schemas/avro/public.orders-value.avsc"),
            include_str!("../../schemas/avro/regionsync.heartbeat-value.avsc"),
        ]
        .iter()
        .map(|text| &*Box::leak(Box::new(Schema::parse_str(text).expect("a schema"))))
        .collect()
    }

    /// xorshift64*: reproducible from a proptest seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// Any i64, small ones as often as large.
        fn long(&mut self) -> i64 {
            (self.next() as i64) >> self.below(64)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        fn string(&mut self) -> String {
            let n = self.below(12);
            (0..n)
                .map(|_| ['a', 'Z', '0', ' ', 'é', '日', '"', '\u{1F600}'][self.below(8) as usize])
                .collect()
        }
    }

    fn random(schema: &Schema, plan: &Plan, rng: &mut Rng, enclosing: Option<&str>) -> Value {
        match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Boolean(rng.below(2) == 1),
            Schema::Int => Value::Int(rng.long() as i32),
            Schema::Long => Value::Long(rng.long()),
            Schema::Float => Value::Float(rng.long() as f32 / 7.0),
            Schema::Double => Value::Double(rng.long() as f64 / 7.0),
            Schema::Bytes => {
                let n = rng.below(20) as usize;
                Value::Bytes(rng.bytes(n))
            }
            Schema::String => Value::String(rng.string()),
            Schema::Fixed(f) => Value::Fixed(f.size, rng.bytes(f.size)),
            Schema::Enum(e) => {
                let i = rng.below(e.symbols.len() as u64) as usize;
                Value::Enum(i as u32, e.symbols[i].clone())
            }
            Schema::Array(a) => Value::Array(
                (0..rng.below(4))
                    .map(|_| random(&a.items, plan, rng, enclosing))
                    .collect(),
            ),
            Schema::Map(m) => Value::Map(
                (0..rng.below(3))
                    .map(|_| (rng.string(), random(&m.types, plan, rng, enclosing)))
                    .collect(),
            ),
            Schema::Union(u) => {
                let i = rng.below(u.variants().len() as u64) as usize;
                let v = random(&u.variants()[i], plan, rng, enclosing);
                Value::Union(i as u32, Box::new(v))
            }
            Schema::Record(r) => {
                let full = r.name.fully_qualified_name(enclosing);
                Value::Record(
                    r.fields
                        .iter()
                        .map(|f| {
                            (
                                f.name.clone(),
                                random(&f.schema, plan, rng, full.namespace()),
                            )
                        })
                        .collect(),
                )
            }
            Schema::Decimal(d) => Value::Decimal(Decimal::from(match &d.inner {
                InnerDecimalSchema::Fixed(f) => rng.bytes(f.size),
                InnerDecimalSchema::Bytes => {
                    let n = 1 + rng.below(6) as usize;
                    rng.bytes(n)
                }
            })),
            Schema::Date => Value::Date(rng.long() as i32),
            Schema::TimeMillis => Value::TimeMillis(rng.long() as i32),
            Schema::TimeMicros => Value::TimeMicros(rng.long()),
            Schema::TimestampMillis => Value::TimestampMillis(rng.long()),
            Schema::TimestampMicros => Value::TimestampMicros(rng.long()),
            Schema::TimestampNanos => Value::TimestampNanos(rng.long()),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(rng.long()),
            Schema::LocalTimestampMicros => Value::LocalTimestampMicros(rng.long()),
            Schema::LocalTimestampNanos => Value::LocalTimestampNanos(rng.long()),
            Schema::Duration(_) => Value::Duration(Duration::new(
                Months::new(rng.next() as u32),
                Days::new(rng.next() as u32),
                Millis::new(rng.next() as u32),
            )),
            Schema::Ref { name } => {
                let named = &plan.names[&*name.fully_qualified_name(enclosing)];
                random(named, plan, rng, enclosing)
            }
            Schema::Uuid(_) => {
                Value::Uuid(apache_avro::Uuid::from_u64_pair(rng.next(), rng.next()))
            }
            Schema::BigDecimal => Value::BigDecimal(apache_avro::BigDecimal::new(
                rng.long().into(),
                rng.long() % 40,
            )),
        }
    }

    fn apache_avro_reads(schema: &Schema, datum: &[u8]) -> Value {
        GenericDatumReader::builder(schema)
            .build()
            .expect("a reader")
            .read_value(&mut &datum[..])
            .expect("apache-avro reads it")
    }

    fn apache_avro_writes(schema: &Schema, value: Value) -> Vec<u8> {
        GenericDatumWriter::builder(schema)
            .build()
            .expect("a writer")
            .write_value_to_vec(value)
            .expect("a valid value")
    }

    fn keep_envelope_fields(value: Value) -> Value {
        let Value::Record(fields) = value else {
            return value;
        };
        Value::Record(
            fields
                .into_iter()
                .filter(|(n, _)| ENVELOPE_FIELDS.contains(&n.as_str()))
                .map(|(n, v)| match (n.as_str(), v) {
                    ("source", Value::Record(s)) => {
                        let s = s
                            .into_iter()
                            .filter(|(n, _)| SOURCE_FIELDS.contains(&n.as_str()))
                            .collect();
                        (n, Value::Record(s))
                    }
                    (_, v) => (n, v),
                })
                .collect(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn reads_what_apache_avro_reads(seed in 1u64..) {
            let mut rng = Rng(seed);
            for schema in schemas() {
                let plan = plan_of(schema);
                let value = random(schema, &plan, &mut rng, None);
                let datum = apache_avro_writes(schema, value.clone());
                prop_assert_eq!(&plan.read(&datum).expect("it reads"), &value);
                prop_assert_eq!(plan.read(&datum).expect("it reads"), apache_avro_reads(schema, &datum));
                // An envelope differs only by the fields the apply never reads.
                prop_assert_eq!(plan.read_envelope(&datum).expect("it reads"), keep_envelope_fields(value));
            }
        }

        #[test]
        fn a_datum_cut_short_is_an_error_not_a_value(seed in 1u64..) {
            let mut rng = Rng(seed);
            for schema in schemas() {
                let plan = plan_of(schema);
                let datum = apache_avro_writes(schema, random(schema, &plan, &mut rng, None));
                for end in 0..datum.len() {
                    prop_assert!(plan.read(&datum[..end]).is_err(), "{} of {} bytes read", end, datum.len());
                    prop_assert!(plan.read_envelope(&datum[..end]).is_err());
                }
            }
        }

        #[test]
        fn any_bytes_are_read_or_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for schema in schemas() {
                let plan = plan_of(schema);
                let _ = plan.read(&bytes);
                let _ = plan.read_envelope(&bytes);
            }
        }
    }

    #[test]
    fn an_envelope_decodes_as_it_did_whole() {
        let schema = schemas()[1];
        let plan = plan_of(schema);
        let key_schema = schemas()[2];
        let key_plan = plan_of(key_schema);
        for seed in 1..200u64 {
            let mut rng = Rng(seed);
            let value = random(schema, &plan, &mut rng, None);
            let datum = apache_avro_writes(schema, value);
            let key = random(key_schema, &key_plan, &mut rng, None);
            let whole = crate::decode::decode_avro(
                key.clone(),
                key_schema,
                Some((plan.read(&datum).unwrap(), schema)),
            );
            let envelope = crate::decode::decode_avro(
                key,
                key_schema,
                Some((plan.read_envelope(&datum).unwrap(), schema)),
            );
            assert_eq!(whole, envelope, "seed {seed}");
        }
    }

    #[test]
    fn errors_say_what_and_where() {
        let schema: &'static Schema = Box::leak(Box::new(
            Schema::parse_str(
                r#"{"type": "record", "name": "R", "fields": [
                {"name": "a", "type": "long"}, {"name": "b", "type": "string"}]}"#,
            )
            .unwrap(),
        ));
        let plan = plan_of(schema);
        // a = 1, then a string of 5 bytes with 2 present.
        assert_eq!(
            plan.read(&[2, 10, b'h', b'i']).unwrap_err().to_string(),
            "the datum ends 3 bytes short at byte 2"
        );
        assert_eq!(
            plan.read(&[0xff; 11]).unwrap_err().to_string(),
            "a number longer than 10 bytes at byte 10"
        );
        // A leaf apache-avro reads: its error, placed.
        let uuid = parsed(r#"{"type": "string", "logicalType": "uuid"}"#);
        let e = uuid.read(&[6, b'a', b'b', b'c']).unwrap_err().to_string();
        assert!(e.ends_with("at byte 0"), "{e}");
    }

    /// A long as the datum writes it (zig-zag varint).
    fn zigzag(n: i64) -> Vec<u8> {
        let mut raw = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let byte = (raw & 0x7f) as u8;
            raw >>= 7;
            if raw == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn parsed(text: &str) -> Plan {
        plan_of(&Schema::parse_str(text).expect("a schema"))
    }

    /// A linked list: each node holds the next through a union.
    const RECURSIVE: &str = r#"{"type": "record", "name": "Node", "fields": [
        {"name": "n", "type": "long"},
        {"name": "next", "type": ["null", "Node"]}]}"#;

    /// `levels` nodes of the recursive schema, each with n = 1.
    fn nested(levels: usize) -> Vec<u8> {
        let mut datum = [2u8, 2].repeat(levels); // n = 1, branch 1 (a Node)
        datum.truncate(datum.len() - 1);
        datum.push(0); // the last node: branch 0 (null)
        datum
    }

    #[test]
    fn a_recursive_schema_nests_only_to_the_depth_limit() {
        let plan = parsed(RECURSIVE);
        // Two levels per node (the record and the union): within the limit
        // it reads, as apache-avro reads it (whose reader needs more stack
        // per level than a test thread has for 30 nodes, unoptimized).
        plan.read(&nested(MAX_DEPTH / 2 - 1))
            .expect("within the limit");
        let shallow = nested(8);
        let value = plan.read(&shallow).expect("within the limit");
        assert_eq!(value, apache_avro_reads(plan.schema(), &shallow));
        // 200,000 levels: without the limit, one stack frame per level
        // overflows the stack and aborts the process (what the worker did,
        // then again on the same message after its restart).
        let deep = nested(100_000);
        for refused in [plan.read(&deep), plan.read_envelope(&deep)] {
            match refused {
                Err(ReadError::Limit(e)) => {
                    assert!(e.contains("deeper than 64 levels"), "{e}");
                    assert!(e.contains("depth limit"), "{e}");
                }
                other => panic!("not refused for its depth: {other:?}"),
            }
        }
    }

    #[test]
    fn items_of_no_bytes_are_bounded_by_the_item_budget() {
        // An array of 4 million empty records in 6 bytes: without the
        // budget it builds them (200 MB of values).
        let plan =
            parsed(r#"{"type": "array", "items": {"type": "record", "name": "E", "fields": []}}"#);
        let mut datum = zigzag(4_000_000);
        datum.push(0);
        match plan.read(&datum) {
            Err(ReadError::Limit(e)) => assert!(e.contains("item-memory budget"), "{e}"),
            other => panic!("not refused: {:?}", other.map(|_| "a value")),
        }
        // Skipped (a field the envelope does not build), items of no bytes
        // are bounded too: arrays of arrays of nulls would otherwise keep a
        // partition busy for as long as their counts say.
        let skipped = parsed(
            r#"{"type": "record", "name": "Envelope", "fields": [
                {"name": "transaction", "type": {"type": "array", "items": {"type": "array", "items": "null"}}},
                {"name": "op", "type": "string"}]}"#,
        );
        let mut datum = zigzag(100);
        for _ in 0..100 {
            datum.extend(zigzag(1_000_000));
            datum.push(0);
        }
        datum.push(0);
        datum.extend([2, b'c']);
        for refused in [skipped.read_envelope(&datum), skipped.read(&datum)] {
            assert!(matches!(refused, Err(ReadError::Limit(_))), "{refused:?}");
        }
    }

    #[test]
    fn real_change_events_stay_far_below_the_budget() {
        // The budget is a bound on abuse, not on data: the repository's
        // Debezium schemas and every kind of value, at random, spend less
        // than three quarters of it per byte.
        for schema in schemas() {
            let plan = plan_of(schema);
            for seed in 1..300u64 {
                let mut rng = Rng(seed);
                let datum = apache_avro_writes(schema, random(schema, &plan, &mut rng, None));
                let mut reader = plan.reader(&datum);
                reader.value(schema, None, Fields::All).expect("it reads");
                assert!(
                    reader.spent <= BUDGET_BASE / 16 + datum.len() * BUDGET_PER_BYTE * 3 / 4,
                    "{} bytes spent on a datum of {}",
                    reader.spent,
                    datum.len()
                );
            }
        }
    }
}
