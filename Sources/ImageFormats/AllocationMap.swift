import BlockEngine

/// The guest disk's ranges, each answered by one layer of the chain, as qemu-img map reports them.
public enum AllocationMap {
    public struct Entry: Sendable {
        public var start: UInt64, length: UInt64, depth: Int
        public var present: Bool, zero: Bool, data: Bool
        public var offset: UInt64?
        public var file: String

        /// One range with the next when qemu-img would print them as one.
        public func merged(with next: Entry) -> Entry? {
            guard start + length == next.start, depth == next.depth, present == next.present, zero == next.zero,
                  data == next.data, (offset == nil) == (next.offset == nil), file == next.file else { return nil }
            if let o = offset, let n = next.offset, o + length != n { return nil }
            var e = self
            e.length += next.length
            return e
        }

        public var json: String {
            var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), \"zero\": \(zero), \"data\": \(data)"
            if let offset { s += ", \"offset\": \(offset)" }
            return s + "}"
        }
    }

    /// Calls `visit` with consecutive entries covering [from, to). Work follows the metadata:
    /// each driver answers whole runs of like clusters at a time.
    public static func walk(_ device: BlockDevice, from: UInt64, to end: UInt64, visit: (Entry) throws -> Void) throws {
        var pos = from
        while pos < end {
            let e = try entry(device, at: pos, maxLength: end - pos, depth: 0)
            precondition(e.length > 0)
            try visit(e)
            pos += e.length
        }
    }

    private static func entry(_ device: BlockDevice, at pos: UInt64, maxLength: UInt64, depth: Int) throws -> Entry {
        let driver = device.driver
        // Past the end of a shorter backing image the disk reads as zeros, allocated nowhere.
        guard pos < device.virtualSize else {
            return Entry(start: pos, length: maxLength, depth: depth, present: false, zero: true, data: false, offset: nil, file: "")
        }
        let limit = min(maxLength, device.virtualSize - pos)
        let mapping = try driver.status(pos, maxLength: limit)
        let here = Entry(start: pos, length: 0, depth: depth, present: true, zero: false, data: true, offset: nil, file: driver.file.path)
        var e = here
        switch mapping {
        case let .data(host, length), let .shared(host, length):
            let (file, offset) = driver.resolve(host: host)
            e.length = length; e.offset = offset; e.file = file.path
        case let .compressed(_, _, length):
            e.length = length
        case let .zero(length):
            e.length = length; e.zero = true; e.data = false
            // A hole in a raw file is still the file's bytes at that offset.
            if driver is RawDriver { e.offset = pos }
        case let .unallocated(length):
            guard let backing = device.backing else {
                e.length = length; e.zero = true; e.data = false
                // QEMU's VDI (which has no backing files there) counts unallocated blocks as
                // allocated zeros; report them as qemu-img does.
                e.present = driver is VDIDriver
                return e
            }
            return try entry(backing, at: pos, maxLength: min(length, limit), depth: depth + 1)
        }
        e.length = min(e.length, limit)
        return e
    }
}
