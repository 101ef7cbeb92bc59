import BlockEngine
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// The copy itself (convert, backup): the source's data runs are read in large pieces and
/// written to the destination through the engine, skipping every 4 KiB block that reads as
/// zeros (a new image already reads as zeros there).
///
/// `ranges` limits the copy to those ranges of the disk (an incremental backup's dirty
/// extents); with `zeroing`, ranges and blocks that read as zeros are made zero in the
/// destination instead of skipped (over a backing file they must hide the older data).
struct ImageCopy {
    let source: BlockDevice
    let destination: BlockDevice
    var ranges: [(offset: UInt64, length: UInt64)]? = nil
    var zeroing = false
    static let piece = 4 << 20, block = 4096

    struct Totals { var read: UInt64 = 0, written: UInt64 = 0, zeroed: UInt64 = 0 }

    /// The pieces to read (data runs, each at most `piece` long) and the ranges that read
    /// as zeros, within `ranges` (the whole disk when nil).
    func plan() throws -> (runs: [(offset: UInt64, length: Int)], zeros: [(offset: UInt64, length: UInt64)]) {
        var runs: [(offset: UInt64, length: Int)] = []
        var zeros: [(offset: UInt64, length: UInt64)] = []
        for (start, length) in ranges ?? [(0, source.virtualSize)] {
            var pos = start
            let end = min(start + length, source.virtualSize)
            while pos < end {
                let s = try source.status(pos, maxLength: end - pos)
                let n = min(max(s.length, 1), end - pos)
                if s.data {
                    var o = pos
                    while o < pos + n {
                        let k = Int(min(UInt64(Self.piece), pos + n - o))
                        runs.append((o, k)); o += UInt64(k)
                    }
                } else if let last = zeros.last, last.offset + last.length == pos {
                    zeros[zeros.count - 1].length += n
                } else {
                    zeros.append((pos, n))
                }
                pos += n
            }
        }
        return (runs, zeros)
    }

    /// `progress` gets the disk offset reached and the bytes read so far.
    func run(progress: (_ offset: UInt64, _ read: UInt64) -> Void) throws -> Totals {
        var totals = Totals()
        let (runs, zeros) = try plan()
        if zeroing {
            for z in zeros {
                try destination.zero(at: z.offset, length: z.length, deallocate: false)
                totals.zeroed += z.length
            }
        }
        let pieces = Pieces(source: source, runs: runs, size: Self.piece)
        defer { pieces.deallocate() }
        // Piece i+1 is read on a serial queue into the other buffer while piece i is written
        // (the read-ahead DiskHasher uses).
        let reader = DispatchQueue(label: "rawmount.convert-read")
        let read = pieces.read
        var current = runs.isEmpty ? nil : read(0)
        for (i, run) in runs.enumerated() {
            if let e = current?.error { throw e }
            let group = DispatchGroup()
            let box = Pieces.Box()
            if i + 1 < runs.count { reader.async(group: group) { box.value = read(i + 1) } }
            let buf = pieces.buffers[i % 2]
            totals.read += UInt64(run.length)
            var b = 0
            while b < run.length {
                // The longest stretch of blocks that are not all zeros, written in one call.
                let zeroStart = b
                while b < run.length, Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                if zeroing, min(b, run.length) > zeroStart {
                    let n = UInt64(min(b, run.length) - zeroStart)
                    do { try destination.zero(at: run.offset + UInt64(zeroStart), length: n, deallocate: false) } catch { group.wait(); throw error }
                    totals.zeroed += n
                }
                let start = b
                while b < run.length, !Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                let end = min(b, run.length)
                if end > start {
                    do {
                        try destination.write(UnsafeRawBufferPointer(rebasing: buf[start..<end]), at: run.offset + UInt64(start))
                    } catch { group.wait(); throw error }
                    totals.written += UInt64(end - start)
                }
            }
            group.wait()
            current = box.value
            progress(run.offset + UInt64(run.length), totals.read)
        }
        return totals
    }

    static func isZero(_ buf: UnsafeMutableRawBufferPointer, _ at: Int, _ count: Int) -> Bool {
        let base = buf.baseAddress! + at
        var i = 0
        while i + 8 <= count {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count { if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }; i += 1 }
        return true
    }
}

/// The two piece buffers and the source, shared with the read-ahead queue.
private final class Pieces: @unchecked Sendable {
    final class Ahead: @unchecked Sendable { var error: (any Error)? }
    final class Box: @unchecked Sendable { var value: Ahead? }
    let source: BlockDevice
    let runs: [(offset: UInt64, length: Int)]
    let buffers: [UnsafeMutableRawBufferPointer]

    init(source: BlockDevice, runs: [(offset: UInt64, length: Int)], size: Int) {
        self.source = source; self.runs = runs
        buffers = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096) }
    }

    @Sendable func read(_ i: Int) -> Ahead {
        let a = Ahead()
        do { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffers[i % 2][0..<runs[i].length]), at: runs[i].offset) } catch { a.error = error }
        return a
    }

    func deallocate() { for b in buffers { b.deallocate() } }
}
