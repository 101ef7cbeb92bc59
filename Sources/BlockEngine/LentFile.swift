#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Memory a read's reply can be written from without first copying the bytes into a buffer
/// (see `ImageMapping.lend`): a read-only shared mapping of an image file, made once when
/// first asked, and a region of zeros.
///
/// Nothing in this process reads these bytes: only the kernel does, when it copies a reply
/// into the reader's pages. A file that shrinks under its mapping then fails that copy
/// (EFAULT, the reader gets EIO) where a read here would raise SIGBUS.
public final class LentFile: Sendable {
    public let file: ImageFile
    /// The mapping's address and length once made (0: not yet; `unmappable`: it cannot be).
    private let base = Atomic<UInt>(0)
    private static let unmappable: UInt = 1
    private let length = Atomic<Int>(0)
    private let making = Mutex<Void>(())

    public init(file: ImageFile) { self.file = file }

    deinit {
        let b = base.load(ordering: .acquiring)
        if b > Self.unmappable { munmap(UnsafeMutableRawPointer(bitPattern: b), length.load(ordering: .relaxed)) }
    }

    /// The file's bytes `[offset, offset + count)`, when the mapping (made at the file's size
    /// when first asked) holds them; nil when it does not or cannot be made.
    public func bytes(at offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
        var b = base.load(ordering: .acquiring)
        if b == 0 { b = map() }
        let n = length.load(ordering: .relaxed)
        guard b > Self.unmappable, count >= 0, offset <= UInt64(n), UInt64(count) <= UInt64(n) - offset else { return nil }
        return UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: b + UInt(offset)), count: count)
    }

    private func map() -> UInt {
        making.withLock { _ in
            let made = base.load(ordering: .acquiring)
            guard made == 0 else { return made }
            guard let size = file.fileStatus().map({ Int($0.st_size) }), size > 0,
                  let p = mmap(nil, size, PROT_READ, MAP_SHARED, file.fd, 0), p != MAP_FAILED else {
                base.store(Self.unmappable, ordering: .releasing)
                return Self.unmappable
            }
            length.store(size, ordering: .relaxed)
            base.store(UInt(bitPattern: p), ordering: .releasing)
            return UInt(bitPattern: p)
        }
    }

    /// Zeros to lend, `zeroBytes` long (never written: its pages are the kernel's zero page).
    nonisolated(unsafe) public static let zeros: UnsafeRawBufferPointer? = {
        guard let p = mmap(nil, zeroBytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else { return nil }
        return UnsafeRawBufferPointer(start: p, count: zeroBytes)
    }()
    public static let zeroBytes = 1 << 20

    /// `count` zeros as regions of `zeros`, appended to `regions`; false when there are none.
    public static func appendZeros(_ count: Int, to regions: inout [UnsafeRawBufferPointer]) -> Bool {
        guard let zeros, let start = zeros.baseAddress else { return false }
        var left = count
        while left > 0 {
            let n = min(left, zeroBytes)
            regions.append(UnsafeRawBufferPointer(start: start, count: n))
            left -= n
        }
        return true
    }
}
