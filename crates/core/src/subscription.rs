//! Subscriptions over the global log: catch up from a checkpoint, then
//! follow live, never skipping an event.
//!
//! A [`Subscription`] reads pages with [`crate::EventReader::read_all`] and
//! advances to each page's [`crate::GlobalPage::scanned_to`]. Because backends never
//! return an event while an earlier one (in `(commit, position)` order) could
//! still commit, following `scanned_to` skips nothing, even when writers
//! commit out of order. When a read comes back empty the subscription waits
//! on the backend's [`WakeUps`] (a commit notification, where the backend has
//! one) for at most the poll interval, then reads again.

use std::collections::VecDeque;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::error::Result;
use crate::store::{EventReader, EventStream, SubscriptionSource, WakeUps};
use crate::types::{EventFilter, GlobalPosition, RecordedEvent};

/// How a subscription reads: filter, page size, and the longest wait between
/// polls when no wake-up arrives.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::{EventFilter, SubscriptionOptions};
///
/// let o = SubscriptionOptions::default()
///     .with_filter(EventFilter::category("order"))
///     .with_batch_size(100)
///     .with_poll_interval(Duration::from_millis(50));
/// assert_eq!(o.batch_size, 100);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Which events to deliver.
    pub filter: EventFilter,
    /// How many events to read per page (at least 1).
    pub batch_size: usize,
    /// The longest wait between reads when nothing new has arrived.
    pub poll_interval: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            filter: EventFilter::all(),
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
        }
    }
}

impl SubscriptionOptions {
    /// Sets the filter.
    pub fn with_filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets the page size (values below 1 count as 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Sets the poll interval.
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }
}

/// A catch-up-then-live subscription to the global log.
///
/// ```
/// use futures::{StreamExt, TryStreamExt};
/// use serde_json::json;
/// use vextrus_core::{EventAppender, ExpectedVersion, GlobalPosition, InMemoryEventStore, NewEvent, StreamId, Subscription, SubscriptionOptions};
/// use vextrus_kernel::EventMetadata;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = InMemoryEventStore::new();
/// let s = StreamId::new("order-1").unwrap();
/// let ev = || NewEvent::new("order.placed", json!({}), EventMetadata::new());
/// store.append_to_stream(&s, ExpectedVersion::Any, &[ev()]).await.unwrap();
///
/// let mut sub = Subscription::new(store.clone(), GlobalPosition::START, SubscriptionOptions::default())
///     .into_stream();
/// // Catch-up: the stored event.
/// assert_eq!(sub.next().await.unwrap().unwrap().stream_version, 1);
/// // Live: an event appended later arrives too.
/// store.append_to_stream(&s, ExpectedVersion::Exact(1), &[ev()]).await.unwrap();
/// assert_eq!(sub.next().await.unwrap().unwrap().stream_version, 2);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Subscription<S> {
    source: S,
    from: GlobalPosition,
    options: SubscriptionOptions,
}

struct State<S> {
    source: S,
    position: GlobalPosition,
    options: SubscriptionOptions,
    buffer: VecDeque<RecordedEvent>,
    wake: Option<WakeUps>,
    failed: bool,
}

impl<S> Subscription<S>
where
    S: SubscriptionSource + Clone + 'static,
{
    /// A subscription that delivers every event after `from` (exclusive).
    pub fn new(source: S, from: GlobalPosition, options: SubscriptionOptions) -> Self {
        Self {
            source,
            from,
            options,
        }
    }

    /// The subscription as an endless stream of events.
    ///
    /// A read error is yielded as an `Err` item; polling the stream again
    /// retries after the poll interval, from the same position.
    pub fn into_stream(self) -> BoxStream<'static, Result<RecordedEvent>> {
        let state = State {
            source: self.source,
            position: self.from,
            options: self.options,
            buffer: VecDeque::new(),
            wake: None,
            failed: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(e) = st.buffer.pop_front() {
                    return Some((Ok(e), st));
                }
                if st.failed {
                    st.failed = false;
                    tokio::time::sleep(st.options.poll_interval).await;
                }
                if st.wake.is_none() {
                    // Subscribe before the first read, so no commit after it is missed.
                    match st.source.wake_ups().await {
                        Ok(w) => st.wake = Some(w),
                        Err(e) => {
                            st.failed = true;
                            return Some((Err(e), st));
                        }
                    }
                }
                let page = st
                    .source
                    .read_all(
                        st.position,
                        &st.options.filter,
                        st.options.batch_size.max(1),
                    )
                    .await;
                match page {
                    Err(e) => {
                        st.failed = true;
                        return Some((Err(e), st));
                    }
                    Ok(page) => {
                        let advanced = page.scanned_to > st.position;
                        st.position = st.position.max(page.scanned_to);
                        if page.events.is_empty() && !advanced {
                            let interval = st.options.poll_interval;
                            if let Some(w) = st.wake.as_mut() {
                                w.wait(interval).await;
                            }
                        }
                        st.buffer.extend(page.events);
                    }
                }
            }
        })
        .boxed()
    }
}

/// Reads the global log after `from` up to its current end, page by page, as
/// a finite stream (for tools such as `vextrus events read`; use a
/// [`Subscription`] to keep following it).
///
/// ```
/// use futures::TryStreamExt;
/// use serde_json::json;
/// use vextrus_core::{EventAppender, EventFilter, ExpectedVersion, GlobalPosition, InMemoryEventStore, NewEvent, StreamId, read_log};
/// use vextrus_kernel::EventMetadata;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = InMemoryEventStore::new();
/// for s in ["order-1", "invoice-1", "order-2"] {
///     let e = NewEvent::new("created", json!({}), EventMetadata::new());
///     store.append_to_stream(&StreamId::new(s).unwrap(), ExpectedVersion::Any, &[e]).await.unwrap();
/// }
/// let orders: Vec<_> = read_log(&store, GlobalPosition::START, EventFilter::category("order"), 1)
///     .try_collect()
///     .await
///     .unwrap();
/// assert_eq!(orders.len(), 2);
/// # });
/// ```
pub fn read_log<S: EventReader>(
    store: &S,
    from: GlobalPosition,
    filter: EventFilter,
    page_size: usize,
) -> EventStream<'_> {
    let page_size = page_size.max(1);
    futures::stream::try_unfold(
        (from, filter, false),
        move |(pos, filter, done)| async move {
            if done {
                return Ok::<_, crate::EventStoreError>(None);
            }
            let page = store.read_all(pos, &filter, page_size).await?;
            // A short page means the read reached the end of the readable log.
            let done = page.events.len() < page_size;
            if page.events.is_empty() {
                return Ok(None);
            }
            let next = pos.max(page.scanned_to);
            Ok(Some((
                futures::stream::iter(page.events.into_iter().map(Ok)),
                (next, filter, done),
            )))
        },
    )
    .try_flatten()
    .boxed()
}
