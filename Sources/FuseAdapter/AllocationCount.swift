import BlockEngine
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The guest bytes st_blocks reports, kept so a stat costs nothing once they are known: the
/// walk that computes them starts in the background when the file is made, and runs again
/// only after the disk changed (the device's change count moved), at most once a second.
/// A walk that fits the stat budget answers at once; a longer one (a huge or fragmented
/// image) runs in the background with the report budget while stat keeps the last answer
/// (or, before the first one, the host file's allocation). An image other processes write
/// (`--force-share`) is walked again every second.
final class AllocationCount: Sendable {
    private struct State {
        var bytes: UInt64? = nil
        /// The device's change count the answer was computed at.
        var changes: UInt64 = 0
        var at = -1e9
        var computing = false
    }
    private let state = Mutex(State())
    private let device: BlockDevice
    /// The guest bytes counted: the whole disk, or one partition.
    private let range: Range<UInt64>?
    static let firstWait = WorkBudget.stat.seconds

    init(device: BlockDevice, range: Range<UInt64>? = nil) {
        self.device = device
        self.range = range
        // The first count is one a stat waits for (a split VMDK's 4096 extents: 20 ms on one
        // core), so it runs on all cores; later ones leave the other cores to guest requests.
        startBackgroundWalk(at: monotonicSeconds(), parallel: true)
    }

    private func walk(_ budget: WorkBudget, parallel: Bool = false) throws -> UInt64? {
        guard let range else { return try device.allocatedBytes(budget: budget, parallel: parallel) }
        return try device.allocatedBytes(from: range.lowerBound, to: range.upperBound, budget: budget, parallel: parallel)
    }

    private func estimate() -> UInt64 {
        let all = device.estimatedAllocatedBytes()
        return range.map { min(all, UInt64($0.count)) } ?? all
    }

    private var followsWriters: Bool { device.driver.file.sharedWithWriters }

    func value() -> UInt64 {
        let now = monotonicSeconds()
        var s = state.withLock { $0 }
        if s.bytes == nil && s.computing, range == nil, let hint = device.driver.allocatedBytesHint, device.backing == nil {
            return hint  // the header's count, until the first walk is done
        }
        if s.bytes == nil && s.computing {
            // The first walk is under way: wait for it a little (a stat must stay quick: a
            // longer walk answers the next stat).
            let deadline = now + Self.firstWait
            while s.bytes == nil && s.computing && monotonicSeconds() < deadline {
                usleep(1000)
                s = state.withLock { $0 }
            }
        }
        if let bytes = s.bytes {
            let stale = s.changes != device.changeCount || (followsWriters && now - s.at >= 1)
            if !stale || s.computing || now - s.at < 1 { return bytes }
        } else if s.computing {
            return estimate()
        }
        let changes = device.changeCount
        let begun = state.withLock { st -> Bool in
            guard !st.computing else { return false }
            st.computing = true; st.at = now
            return true
        }
        guard begun else { return s.bytes ?? estimate() }
        if let bytes = try? walk(.stat) {
            state.withLock { $0 = State(bytes: bytes, changes: changes, at: now, computing: false) }
            return bytes
        }
        state.withLock { $0.computing = false }
        startBackgroundWalk(at: now)
        return s.bytes ?? estimate()
    }

    /// A full walk (report budget) off the request path; past that budget too, the host
    /// file's allocation stands in.
    private func startBackgroundWalk(at now: Double, parallel: Bool = false) {
        let begun = state.withLock { st -> Bool in
            guard !st.computing else { return false }
            st.computing = true; st.at = now
            return true
        }
        guard begun else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            let changes = device.changeCount
            let bytes = (try? walk(.report, parallel: parallel)) ?? estimate()
            state.withLock { $0 = State(bytes: bytes, changes: changes, at: monotonicSeconds(), computing: false) }
        }
    }
}
