//! Accounting: a double-entry ledger.
//!
//! Every [`JournalEntry`] is checked on post: its debits equal its credits
//! in each currency, every line is one-sided and positive, or nothing is
//! written ([`Error::Unbalanced`]). The entries the saga posts:
//!
//! | event | debit | credit |
//! |---|---|---|
//! | invoice (after capture) | [`Account::Receivable`] | [`Account::Revenue`] |
//! | reversal of an invoice (compensation) | [`Account::Revenue`] | [`Account::Receivable`] |
//! | settlement (the processor pays the captured money out) | [`Account::Cash`] | [`Account::Receivable`] |
//!
//! The receivable is owed by the payment processor: the order's money was
//! captured from the customer's card, but has not reached our bank yet. So
//! at rest the receivable balance in each currency equals the
//! captured-but-unsettled payments (see [`crate::invariants`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use vextrus_kernel::{AggregateId, Currency, Money};

use crate::db::{self, Database, IdempotencyKey, Migration};
use crate::error::{Error, Result};
use crate::faults::FaultInjector;
use crate::participant::Participant;
use crate::payment::minor_i64;

const P: &str = "accounting";

/// Accounting's migrations.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "accounting",
    sql: include_str!("../migrations/0001_accounting.sql"),
}];

/// A ledger account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Account {
    /// Money owed to us (by the payment processor for captured payments).
    Receivable,
    /// Income from delivered orders.
    Revenue,
    /// Money in the bank.
    Cash,
}

impl Account {
    /// The account's stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Account::Receivable => "receivable",
            Account::Revenue => "revenue",
            Account::Cash => "cash",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Account> {
        match name {
            "receivable" => Some(Account::Receivable),
            "revenue" => Some(Account::Revenue),
            "cash" => Some(Account::Cash),
            _ => None,
        }
    }
}

/// One side of one line of a journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// A debit.
    Debit(Money),
    /// A credit.
    Credit(Money),
}

/// One line of a journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalLine {
    /// The account.
    pub account: Account,
    /// Debit or credit, and how much.
    pub side: Side,
}

/// A journal entry whose debits equal its credits in every currency.
///
/// ```
/// use vextrus_kernel::{Currency, Money};
/// use vextrus_order_to_cash::accounting::{Account, JournalEntry, JournalLine, Side};
///
/// let usd = |m| Money::from_minor(m, Currency::USD);
/// let balanced = JournalEntry::new(vec![
///     JournalLine { account: Account::Receivable, side: Side::Debit(usd(500)) },
///     JournalLine { account: Account::Revenue, side: Side::Credit(usd(500)) },
/// ]);
/// assert!(balanced.is_ok());
///
/// let lopsided = JournalEntry::new(vec![
///     JournalLine { account: Account::Receivable, side: Side::Debit(usd(500)) },
///     JournalLine { account: Account::Revenue, side: Side::Credit(usd(499)) },
/// ]);
/// assert!(lopsided.is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    lines: Vec<JournalLine>,
}

impl JournalEntry {
    /// Checks the lines: at least two, each amount positive, and debits
    /// equal to credits in every currency.
    pub fn new(lines: Vec<JournalLine>) -> Result<Self> {
        if lines.len() < 2 {
            return Err(Error::invalid(
                "lines",
                "a journal entry needs at least two lines",
            ));
        }
        let mut sums: BTreeMap<Currency, (i128, i128)> = BTreeMap::new();
        for line in &lines {
            let (amount, is_debit) = match line.side {
                Side::Debit(m) => (m, true),
                Side::Credit(m) => (m, false),
            };
            if !amount.is_positive() {
                return Err(Error::invalid(
                    "amount",
                    format!("{amount} on {:?} is not positive", line.account),
                ));
            }
            let entry = sums.entry(amount.currency()).or_default();
            if is_debit {
                entry.0 += amount.to_minor_units();
            } else {
                entry.1 += amount.to_minor_units();
            }
        }
        for (currency, (debits, credits)) in sums {
            if debits != credits {
                return Err(Error::Unbalanced {
                    currency: currency.code().to_owned(),
                    debits,
                    credits,
                });
            }
        }
        Ok(Self { lines })
    }

    /// A two-line entry: debit `debit`, credit `credit`, both `amount`.
    pub fn simple(debit: Account, credit: Account, amount: Money) -> Result<Self> {
        Self::new(vec![
            JournalLine {
                account: debit,
                side: Side::Debit(amount),
            },
            JournalLine {
                account: credit,
                side: Side::Credit(amount),
            },
        ])
    }

    /// The lines.
    pub fn lines(&self) -> &[JournalLine] {
        &self.lines
    }
}

/// What accounting can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AccountingCommand {
    /// Posts an order's invoice: debit receivable, credit revenue.
    PostInvoice {
        /// The order.
        order_id: AggregateId,
        /// The invoiced amount.
        amount: Money,
    },
    /// Reverses an order's invoice (compensation of `PostInvoice`).
    ReverseInvoice {
        /// The order.
        order_id: AggregateId,
    },
    /// Records the processor's payout: debit cash, credit receivable.
    RecordSettlement {
        /// The order.
        order_id: AggregateId,
        /// The amount paid out.
        amount: Money,
    },
}

/// What accounting answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum AccountingReply {
    /// The invoice entry is posted.
    Invoiced {
        /// Its entry id.
        entry_id: String,
        /// The amount.
        amount: Money,
    },
    /// The invoice is reversed (or there was none to reverse).
    Reversed {
        /// The reversing entry's id, if one was posted.
        entry_id: Option<String>,
    },
    /// The settlement entry is posted.
    Settled {
        /// Its entry id.
        entry_id: String,
    },
}

/// One stored ledger line with its entry's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLine {
    /// The entry.
    pub entry_id: String,
    /// The entry's order.
    pub order_id: String,
    /// `invoice`, `settlement` or `reversal`.
    pub kind: String,
    /// The entry this one reverses, if a reversal.
    pub reverses: Option<String>,
    /// The account name.
    pub account: String,
    /// The currency code.
    pub currency: String,
    /// Debit, minor units.
    pub debit_minor: i64,
    /// Credit, minor units.
    pub credit_minor: i64,
}

/// The accounting participant.
///
/// ```
/// use std::sync::Arc;
/// use vextrus_kernel::{AggregateId, Currency, Money};
/// use vextrus_order_to_cash::accounting::{Account, Accounting, AccountingReply};
/// use vextrus_order_to_cash::{Database, FaultInjector, IdempotencyKey};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let accounting = Accounting::new(Database::temporary().await?, Arc::new(FaultInjector::disabled()));
/// accounting.migrate().await?;
/// let order = AggregateId::new("o-1")?;
/// let amount = Money::from_minor(9_99, Currency::EUR);
/// accounting.post_invoice(&IdempotencyKey::new("o-1/invoice")?, &order, amount).await?;
/// assert_eq!(accounting.balance(Account::Receivable, Currency::EUR).await?, 999);
/// assert_eq!(accounting.balance(Account::Revenue, Currency::EUR).await?, -999);
///
/// accounting.reverse_invoice(&IdempotencyKey::new("o-1/uninvoice")?, &order).await?;
/// assert_eq!(accounting.balance(Account::Receivable, Currency::EUR).await?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Accounting {
    db: Database,
    faults: Arc<FaultInjector>,
}

impl Accounting {
    /// Accounting over `db`, consulting `faults`.
    pub fn new(db: Database, faults: Arc<FaultInjector>) -> Self {
        Self { db, faults }
    }

    /// Creates or updates accounting's tables.
    pub async fn migrate(&self) -> Result<usize> {
        db::migrate(&self.db, P, MIGRATIONS).await
    }

    /// Posts an order's invoice.
    pub async fn post_invoice(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        amount: Money,
    ) -> Result<AccountingReply> {
        let command = AccountingCommand::PostInvoice {
            order_id: order_id.clone(),
            amount,
        };
        self.handle(key, &command).await
    }

    /// Reverses an order's invoice (compensation).
    pub async fn reverse_invoice(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<AccountingReply> {
        let order_id = order_id.clone();
        self.handle(key, &AccountingCommand::ReverseInvoice { order_id })
            .await
    }

    /// Records a settlement.
    pub async fn record_settlement(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        amount: Money,
    ) -> Result<AccountingReply> {
        let command = AccountingCommand::RecordSettlement {
            order_id: order_id.clone(),
            amount,
        };
        self.handle(key, &command).await
    }

    /// Every ledger line, by entry and line number.
    pub async fn lines(&self) -> Result<Vec<LedgerLine>> {
        let rows = sqlx::query(
            "SELECT e.entry_id, e.order_id, e.kind, e.reverses, l.account, l.currency, l.debit_minor, l.credit_minor
             FROM accounting_lines l JOIN accounting_entries e ON e.entry_id = l.entry_id
             ORDER BY e.entry_id, l.line_no",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        rows.iter()
            .map(|r| {
                Ok(LedgerLine {
                    entry_id: r.try_get(0)?,
                    order_id: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    reverses: r.try_get(3)?,
                    account: r.try_get(4)?,
                    currency: r.try_get(5)?,
                    debit_minor: r.try_get(6)?,
                    credit_minor: r.try_get(7)?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(Error::db(P))
    }

    /// An account's balance in one currency: debits minus credits, in minor
    /// units.
    pub async fn balance(&self, account: Account, currency: Currency) -> Result<i64> {
        sqlx::query(
            "SELECT CAST(COALESCE(SUM(debit_minor - credit_minor), 0) AS BIGINT)
             FROM accounting_lines WHERE account = $1 AND currency = $2",
        )
        .bind(account.as_str())
        .bind(currency.code())
        .fetch_one(self.db.pool())
        .await
        .and_then(|r| r.try_get(0))
        .map_err(Error::db(P))
    }

    /// Posts a checked entry inside the caller's transaction.
    async fn post(
        conn: &mut AnyConnection,
        entry_id: &str,
        order_id: &AggregateId,
        kind: &str,
        reverses: Option<&str>,
        memo: &str,
        entry: &JournalEntry,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO accounting_entries (entry_id, order_id, kind, reverses, memo) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(entry_id)
        .bind(order_id.as_str())
        .bind(kind)
        .bind(reverses)
        .bind(memo)
        .execute(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        for (n, line) in entry.lines().iter().enumerate() {
            let (debit, credit) = match line.side {
                Side::Debit(m) => (minor_i64(&m, "amount")?, 0),
                Side::Credit(m) => (0, minor_i64(&m, "amount")?),
            };
            let currency = match line.side {
                Side::Debit(m) | Side::Credit(m) => m.currency(),
            };
            sqlx::query(
                "INSERT INTO accounting_lines (entry_id, line_no, account, currency, debit_minor, credit_minor)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(entry_id)
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .bind(line.account.as_str())
            .bind(currency.code())
            .bind(debit)
            .bind(credit)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?;
        }
        Ok(())
    }

    /// The order's invoice entry and whether it was reversed.
    async fn invoice_of(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<Option<(String, bool)>> {
        let row = sqlx::query(
            "SELECT e.entry_id,
                    CAST((SELECT COUNT(*) FROM accounting_entries r WHERE r.reverses = e.entry_id) AS BIGINT)
             FROM accounting_entries e WHERE e.order_id = $1 AND e.kind = 'invoice'",
        )
        .bind(order_id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        row.map(|r| {
            let id: String = r.try_get(0)?;
            let reversals: i64 = r.try_get(1)?;
            Ok((id, reversals > 0))
        })
        .transpose()
        .map_err(Error::db(P))
    }

    async fn invoice_amount(conn: &mut AnyConnection, entry_id: &str) -> Result<Money> {
        let row = sqlx::query(
            "SELECT currency, debit_minor FROM accounting_lines WHERE entry_id = $1 AND account = 'receivable'",
        )
        .bind(entry_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        let currency: String = row.try_get(0).map_err(Error::db(P))?;
        let minor: i64 = row.try_get(1).map_err(Error::db(P))?;
        let currency: Currency =
            currency
                .parse()
                .map_err(|e: vextrus_kernel::MoneyError| Error::Corrupt {
                    participant: P,
                    reason: e.to_string(),
                })?;
        Ok(Money::from_minor(minor, currency))
    }
}

impl Participant for Accounting {
    const NAME: &'static str = P;
    type Command = AccountingCommand;
    type Reply = AccountingReply;

    fn business_failure(_reply: &AccountingReply) -> Option<String> {
        None
    }

    fn database(&self) -> &Database {
        &self.db
    }

    fn faults(&self) -> &Arc<FaultInjector> {
        &self.faults
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        key: &IdempotencyKey,
        command: &AccountingCommand,
    ) -> Result<AccountingReply> {
        let entry_id = format!("je-{}", db::fnv1a_hex(key.as_str()));
        match command {
            AccountingCommand::PostInvoice { order_id, amount } => {
                let entry = JournalEntry::simple(Account::Receivable, Account::Revenue, *amount)?;
                match Self::invoice_of(conn, order_id).await? {
                    Some((id, false)) => {
                        let posted = Self::invoice_amount(conn, &id).await?;
                        if posted != *amount {
                            return Err(Error::IllegalState {
                                participant: P,
                                reason: format!(
                                    "order {order_id} is already invoiced for {posted}"
                                ),
                            });
                        }
                        return Ok(AccountingReply::Invoiced {
                            entry_id: id,
                            amount: posted,
                        });
                    }
                    Some((_, true)) => {
                        return Err(Error::IllegalState {
                            participant: P,
                            reason: format!("order {order_id}'s invoice was reversed"),
                        });
                    }
                    None => {}
                }
                Self::post(
                    conn, &entry_id, order_id, "invoice", None, "invoice", &entry,
                )
                .await?;
                Ok(AccountingReply::Invoiced {
                    entry_id,
                    amount: *amount,
                })
            }
            AccountingCommand::ReverseInvoice { order_id } => {
                match Self::invoice_of(conn, order_id).await? {
                    Some((id, false)) => {
                        let amount = Self::invoice_amount(conn, &id).await?;
                        let entry =
                            JournalEntry::simple(Account::Revenue, Account::Receivable, amount)?;
                        Self::post(
                            conn,
                            &entry_id,
                            order_id,
                            "reversal",
                            Some(&id),
                            "invoice reversed",
                            &entry,
                        )
                        .await?;
                        Ok(AccountingReply::Reversed {
                            entry_id: Some(entry_id),
                        })
                    }
                    _ => Ok(AccountingReply::Reversed { entry_id: None }),
                }
            }
            AccountingCommand::RecordSettlement { order_id, amount } => {
                let entry = JournalEntry::simple(Account::Cash, Account::Receivable, *amount)?;
                Self::post(
                    conn,
                    &entry_id,
                    order_id,
                    "settlement",
                    None,
                    "processor payout",
                    &entry,
                )
                .await?;
                Ok(AccountingReply::Settled { entry_id })
            }
        }
    }
}
