//! The subscription's side that the application holds: the stream of
//! deliveries taken from the driver's buffer, and the acker of each.

use super::*;

/// The stream handed to the application.
pub(crate) struct KafkaStream {
    pub(super) shared: Arc<Shared>,
    /// Sends the commits of a recovering partition; released on a blocking
    /// thread, as the last handle's drop closes the consumer.
    pub(super) consumer: Option<ClientHandle>,
    /// The delivery counts' client (released with the consumer's handle).
    pub(super) counts: Option<Arc<CountStore>>,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) driver: Option<JoinHandle<Result<()>>>,
    pub(super) close_timeout: Duration,
}

#[async_trait]
impl DeliveryStream for KafkaStream {
    // Cancel-safe: a delivery leaves the buffer only in the same
    // synchronous step that returns it; reads and stores of delivery counts
    // are kept in the state and are harmless to repeat.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let mut commit = true;
        loop {
            // Waiting after the look is safe: every wake-up of `ready` is
            // `notify_one`, which leaves a permit when no one waits yet.
            match self.step(&mut commit) {
                Ok(next) => return next,
                Err(Step::Read(partitions)) => self.read_counts(partitions).await,
                Err(Step::Store {
                    partition,
                    token,
                    value,
                }) => self.store_count(partition, token, value).await,
                Err(Step::SyncCommit) => {
                    commit = false;
                    self.commit_now().await;
                }
                Err(Step::Hold(until)) => {
                    let _ = tokio::time::timeout_at(until, self.shared.ready.notified()).await;
                }
                Err(_) => self.shared.ready.notified().await,
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        let result = match tokio::time::timeout(self.close_timeout * 2, driver).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(BrokerError::backend("kafka", join)),
            Err(_) => Err(BrokerError::Timeout {
                operation: "kafka subscription close",
                after: self.close_timeout * 2,
            }),
        };
        if let Some(release) = self.release() {
            let _ = tokio::time::timeout(self.close_timeout, release).await;
        }
        result
    }
}

impl Drop for KafkaStream {
    fn drop(&mut self) {
        // Without `close`: dropping `stop` ends the driver; the client goes
        // when the last handle does.
        self.shared.closed.store(true, Ordering::Release);
        self.release();
    }
}

impl KafkaStream {
    /// The steps of [`DeliveryStream::next`] that need no waiting: `Ok`
    /// with its answer, or `Err` with what to await first (`Wait`, `Read`
    /// or `Store`; dropping it is harmless, as the state keeps it).
    /// `commit`: a recovering partition's commit is not sent yet in this
    /// call of `next`.
    fn step(&self, commit: &mut bool) -> std::result::Result<Option<Result<Delivery>>, Step> {
        loop {
            let step = self.shared.lock().next_step(*commit);
            match step {
                // Built outside the lock: the driver and ackers need it.
                Step::Deliver(b) => return Ok(Some(Ok(self.delivery(b)))),
                Step::Failed(e) => return Ok(Some(Err(e))),
                Step::Finished => return Ok(None),
                Step::Commit(commits) => {
                    *commit = false;
                    if let Some(consumer) = &self.consumer {
                        send_commits(consumer, &self.shared, commits);
                    }
                }
                wait => return Err(wait),
            }
        }
    }

    /// What [`DeliveryStream::next`] would return at once, if anything.
    pub(crate) fn next_now(&self) -> Option<Option<Result<Delivery>>> {
        self.step(&mut true).ok()
    }

    fn delivery(&self, b: Buffered) -> Delivery {
        let (record, redelivered, token) = b.into_record();
        let received = Received {
            message: record.message.clone(),
            topic: self.shared.topic.clone(),
            redelivered,
            partition: Some(record.partition),
            offset: Some(record.offset),
            attempt: record.attempt,
        };
        let acker = KafkaAcker {
            shared: self.shared.clone(),
            record,
            token,
        };
        Delivery::new(received, Box::new(acker))
    }

    /// Lets the stream's handle of the client go, on a blocking thread (if
    /// it is the last, its drop closes the consumer).
    fn release(&mut self) -> Option<JoinHandle<()>> {
        let counts = self.counts.take();
        let consumer = self.consumer.take()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(runtime.spawn_blocking(move || {
            drop(consumer);
            drop(counts);
        }))
    }

    /// Reads the stored delivery counts of `partitions` (on a blocking
    /// thread). A failed read makes them recover.
    async fn read_counts(&self, partitions: Vec<(i32, u64)>) {
        let ids: Vec<i32> = partitions.iter().map(|&(p, _)| p).collect();
        let values = match self.counts.clone() {
            Some(store) => {
                retried(|| {
                    let (store, ids) = (store.clone(), ids.clone());
                    move || store.read(&ids, STORE_TIMEOUT)
                })
                .await
            }
            None => Err("subscription closed".to_owned()),
        };
        if let Err(e) = &values {
            tracing::warn!(error = %e, topic = %self.shared.topic, "reading delivery counts failed; the partitions recover from an unclean finish");
        }
        let mut state = self.shared.lock();
        for (partition, epoch) in partitions {
            let value = match &values {
                Ok(values) => Ok(values
                    .iter()
                    .find(|&&(p, _)| p == partition)
                    .and_then(|&(_, v)| v)),
                Err(_) => Err(()),
            };
            state.counts.read(partition, epoch, value);
        }
    }

    /// Commits synchronously what the broker has not confirmed (on a
    /// blocking thread, bounded by [`STORE_TIMEOUT`]); a failed commit is
    /// sent again later.
    async fn commit_now(&self) {
        let commits = self.shared.lock().tracker.take_unconfirmed();
        if commits.is_empty() {
            return;
        }
        let committed = match self.consumer.clone() {
            Some(consumer) => {
                let tpl = offsets_list(&self.shared.topic, &commits);
                blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await
            }
            None => Err("subscription closed".to_owned()),
        };
        if let Err(e) = committed {
            tracing::warn!(error = %e, topic = %self.shared.topic, "offset commit failed; will retry");
            let mut state = self.shared.lock();
            for (p, o) in commits {
                state.tracker.commit_failed(p, o);
            }
        }
    }

    /// Stores the delivery count of the buffered record with hand-out
    /// `token` on a blocking thread; then it may be handed out. A failed
    /// store is reported and the record handed out all the same.
    async fn store_count(&self, partition: i32, token: Token, value: i64) {
        // What finished goes out first: it most likely lands while this
        // store waits, so a crash soon after replays little.
        if let Some(consumer) = &self.consumer {
            let commits = self.shared.lock().tracker.take_commits();
            send_commits(consumer, &self.shared, commits);
        }
        let stored = match self.counts.clone() {
            Some(store) => {
                retried(|| {
                    let store = store.clone();
                    move || store.store(&[(partition, value)], CommitMode::Sync)
                })
                .await
            }
            None => Err("subscription closed".to_owned()),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, topic = %self.shared.topic, partition, "storing a delivery count failed; a crash now is not counted");
        }
        let mut state = self.shared.lock();
        if let Some(b) = state.buffer.iter_mut().find(|b| b.token == token) {
            b.store = None;
        }
    }
}

/// Settles one delivery in the tracker.
struct KafkaAcker {
    shared: Arc<Shared>,
    /// Kept to hand the record out again on `nack(requeue)`.
    record: Record,
    token: Token,
}

impl KafkaAcker {
    fn check_open(&self) -> Result<()> {
        match self.shared.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("kafka subscription")),
            false => Ok(()),
        }
    }

    fn finish(&self) {
        let Record {
            partition, offset, ..
        } = self.record;
        self.shared.state.update((partition, offset, self.token));
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.check_open()?;
        self.finish();
        Ok(())
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.check_open()?;
        if !requeue {
            // Dropped from the group: same as finished for the offsets.
            self.finish();
            return Ok(());
        }
        let (partition, offset) = (self.record.partition, self.record.offset);
        let mut state = self.shared.lock();
        let Some(token) = state.tracker.requeue(partition, offset, self.token) else {
            return Ok(());
        };
        // Before later records of the same partition, after earlier ones.
        let at = state
            .buffer
            .iter()
            .position(|b| b.partition == partition && b.offset > offset)
            .unwrap_or(0);
        let requeued = Buffered {
            message: self.record.message,
            partition,
            offset,
            redelivered: true,
            token,
            // Counted in this process only: nothing to store.
            attempt: Some(self.record.attempt.saturating_add(1)),
            store: None,
        };
        state.buffer.insert(at, requeued);
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Produces the copy to its tier of the topic's delay topic, for this
    /// group only (see [`crate::delay`]), then acks the record; when that
    /// fails, the record is handed out again.
    async fn retry_after(self: Box<Self>, message: Message, delay: Duration) -> Result<()> {
        self.check_open()?;
        let sent = match self.shared.retry.clone() {
            Some(retry) => retry.send(message, delay, self.record.partition).await,
            None => Err(BrokerError::Unsupported {
                backend: "kafka",
                operation: "delayed retry on a topic without a delay topic",
            }),
        };
        match sent {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.nack(true).await?;
                Err(e)
            }
        }
    }
}

/// Runs `f()` as [`blocking`] does, up to [`TRIES`] times while it fails:
/// a count that could not be read or stored costs a crash uncounted, and a
/// coordinator that just started answers with retriable errors.
async fn retried<T, F>(f: impl Fn() -> F) -> std::result::Result<T, String>
where
    F: FnOnce() -> KafkaResult<T> + Send + 'static,
    T: Send + 'static,
{
    let mut result = blocking(f()).await;
    for _ in 1..TRIES {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        result = blocking(f()).await;
    }
    result
}

/// Attempts at reading or storing delivery counts.
const TRIES: usize = 3;

/// Runs `f` on a blocking thread for at most [`STORE_TIMEOUT`] (plus a
/// second); errors as text.
async fn blocking<T, F>(f: F) -> std::result::Result<T, String>
where
    F: FnOnce() -> KafkaResult<T> + Send + 'static,
    T: Send + 'static,
{
    let bound = STORE_TIMEOUT + Duration::from_secs(1);
    match tokio::time::timeout(bound, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(join)) => Err(join.to_string()),
        Err(_) => Err(format!("no answer within {bound:?}")),
    }
}
