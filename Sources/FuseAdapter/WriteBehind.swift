import BlockEngine
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Large writes are acknowledged once copied, and applied to the image on one background
/// thread while the next request is already being received: a sequential writer (dd, fio,
/// qemu-img convert, mkfs) then keeps both CPUs busy, one receiving, one writing the image.
///
/// Like a disk's volatile write cache: a completed write is visible to every later request
/// (each one that touches the image waits for the backlog first), but it is durable only
/// after fsync/flush, which wait for it too. A failure of a write already acknowledged is
/// reported by the next write, fallocate, flush or fsync, and at unmount; it puts the
/// device in its failed state, so every later write and flush fails too. At most `slots`
/// writes are held; the next one waits for a slot.
public final class WriteBehind: Sendable {
    let device: BlockDevice
    /// Writes smaller than this are written in place: their copy would cost about what it saves.
    static let threshold = 64 << 10
    static let slotSize = 1 << 20
    static let slots = 4
    /// Tests widen the window between acknowledging and applying a write with this.
    static let testApplyDelay: UInt32 = getenv("RAWMOUNT_TEST_APPLY_DELAY_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    private let queue = DispatchQueue(label: "rawmount.write-behind")
    private let pending = Atomic<Int>(0)
    /// A copy buffer; it belongs to one queued write at a time.
    struct Slot: @unchecked Sendable { let base: UnsafeMutableRawPointer }
    private let free = Mutex<[Slot]>([])
    private let slotsAvailable = DispatchSemaphore(value: WriteBehind.slots)
    private let failure = Mutex<WriteBehindFailure?>(nil)

    public init(device: BlockDevice) {
        self.device = device
    }

    deinit { for slot in free.withLock({ $0 }) { slot.base.deallocate() } }

    /// True if the write was taken: it will be applied later, in order.
    func accept(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard data.count >= Self.threshold, data.count <= Self.slotSize else { return false }
        slotsAvailable.wait()
        let slot = free.withLock { $0.popLast() }
            ?? Slot(base: UnsafeMutableRawPointer.allocate(byteCount: Self.slotSize, alignment: 4096))
        slot.base.copyMemory(from: data.baseAddress!, byteCount: data.count)
        let count = data.count
        pending.add(1, ordering: .sequentiallyConsistent)
        queue.async { [self] in
            if Self.testApplyDelay > 0 { usleep(Self.testApplyDelay) }
            do {
                try device.write(UnsafeRawBufferPointer(start: slot.base, count: count), at: offset)
            } catch {
                let what = "write \(count) bytes at \(offset), acknowledged earlier"
                let f = WriteBehindFailure(what: what, underlying: error)
                failure.withLock { if $0 == nil { $0 = f } }
                // Acknowledged bytes are lost: like a failed fdatasync, no later flush of
                // this mount may succeed as if they were on disk.
                device.markFailed(f)
            }
            free.withLock { $0.append(slot) }
            slotsAvailable.signal()
            pending.subtract(1, ordering: .sequentiallyConsistent)
        }
        return true
    }

    /// Waits until every acknowledged write has reached the image.
    func drain() {
        if pending.load(ordering: .sequentiallyConsistent) == 0 { return }
        queue.sync {}
    }

    /// Throws the first failure of an acknowledged write since the last report, once (as the
    /// kernel reports a writeback error), without waiting for the backlog.
    func reportFailure() throws {
        if let f = failure.withLock({ s -> WriteBehindFailure? in defer { s = nil }; return s }) { throw f }
    }

    /// Waits for the backlog, then reports any failure in it.
    public func settle() throws {
        drain()
        try reportFailure()
    }
}

/// An acknowledged write that could not be applied; carries the original error's errno.
public struct WriteBehindFailure: Error, Sendable, CustomStringConvertible {
    public let what: String
    public let underlying: Error
    public var description: String { "\(what): \(underlying)" }
    var errnoValue: Int32 { (underlying as? BlockError)?.errnoValue ?? EIO }
}
