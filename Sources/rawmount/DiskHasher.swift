import BlockEngine
import Crypto
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// Digests of a guest disk (or a range of it, a partition) in one pass: the next chunk is
/// read while the current one is hashed, several algorithms hash the same chunk on all
/// cores, and chunks the image holds no data for are hashed from a zero buffer without
/// reading anything.
struct DiskHasher: Sendable {
    enum Algorithm: String, CaseIterable {
        case md5, sha1, sha256, sha512
        var hexLength: Int {
            switch self { case .md5: 32; case .sha1: 40; case .sha256: 64; case .sha512: 128 }
        }
        func start() -> RunningDigest {
            switch self {
            case .md5: RunningDigest(Insecure.MD5())
            case .sha1: RunningDigest(Insecure.SHA1())
            case .sha256: RunningDigest(SHA256())
            case .sha512: RunningDigest(SHA512())
            }
        }
    }

    /// One algorithm's state; fed by one thread at a time.
    final class RunningDigest: @unchecked Sendable {
        private let feed: (UnsafeRawBufferPointer) -> Void
        private let finish: () -> String
        init<H: HashFunction>(_ initial: H) {
            var state = initial
            feed = { state.update(bufferPointer: $0) }
            finish = { state.finalize().map { byte in (byte < 16 ? "0" : "") + String(byte, radix: 16) }.joined() }
        }
        func update(_ bytes: UnsafeRawBufferPointer) { feed(bytes) }
        func hex() -> String { finish() }
    }

    static let chunk = 4 << 20

    let device: BlockDevice
    let start: UInt64
    let length: UInt64

    /// Bytes of one chunk, handed between the reading thread and the hashing ones.
    struct Chunk: @unchecked Sendable { let bytes: UnsafeRawBufferPointer }

    /// The two read buffers and the zero buffer; a buffer is filled by the reader while the
    /// other one is hashed, never both at once.
    final class Buffers: @unchecked Sendable {
        let read = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: DiskHasher.chunk, alignment: 4096) }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: DiskHasher.chunk, alignment: 4096)
        init() { zeros.initializeMemory(as: UInt8.self, repeating: 0) }
        deinit { read.forEach { $0.deallocate() }; zeros.deallocate() }
    }

    /// The chunk at `pos` in buffer `k`; chunks holding no data come from the zero buffer.
    private func load(_ pos: UInt64, into k: Int, _ buffers: Buffers) -> Result<Chunk, any Error> {
        Result {
            let n = Int(min(UInt64(Self.chunk), start + length - pos))
            if try holdsNoData(pos, n) { return Chunk(bytes: UnsafeRawBufferPointer(rebasing: buffers.zeros[0..<n])) }
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffers.read[k][0..<n])
            try device.read(into: piece, at: pos)
            return Chunk(bytes: UnsafeRawBufferPointer(piece))
        }
    }

    /// The digests, by algorithm; `progress(done)` is called after each chunk.
    func run(_ algorithms: [Algorithm], progress: (UInt64) -> Void) throws -> [Algorithm: String] {
        let digests = algorithms.map { $0.start() }
        let buffers = Buffers()
        let reader = DispatchQueue(label: "rawmount.hash-read")
        let end = start + length
        var pos = start
        var current = length > 0 ? load(pos, into: 0, buffers) : nil
        var k = 0
        /// The chunk read ahead while the current one is hashed.
        final class Ahead: @unchecked Sendable { var value: Result<Chunk, any Error>? }
        while let loaded = current {
            let chunk = try loaded.get()
            let next = pos + UInt64(chunk.bytes.count)
            let ahead = Ahead()
            let group = DispatchGroup()
            if next < end {
                let other = 1 - k
                reader.async(group: group) { ahead.value = self.load(next, into: other, buffers) }
            }
            if digests.count == 1 {
                digests[0].update(chunk.bytes)
            } else {
                DispatchQueue.concurrentPerform(iterations: digests.count) { digests[$0].update(chunk.bytes) }
            }
            group.wait()
            progress(next - start)
            pos = next
            current = ahead.value
            k = 1 - k
        }
        var out: [Algorithm: String] = [:]
        for (a, d) in zip(algorithms, digests) { out[a] = d.hex() }
        return out
    }

    /// Whether the image holds nothing but zeros in `[pos, pos+n)`: the engine's SEEK_DATA,
    /// stopped at the chunk's end, finds no data there (backing images included).
    private func holdsNoData(_ pos: UInt64, _ n: Int) throws -> Bool {
        try device.seek(from: pos, data: true, end: pos + UInt64(n)) == nil
    }
}
