#if canImport(Glibc)
import Glibc
#endif

/// Every failure the engine and the format drivers report. Each case carries enough context
/// (file, offset, field) to print one clear sentence at the CLI and to pick an errno at the
/// FUSE edge.
public enum BlockError: Error, Equatable, CustomStringConvertible {
    /// A system call failed.
    case io(file: String, operation: String, offset: UInt64?, errno: Int32)
    /// The file ended before a structure that must be there.
    case truncated(file: String, what: String, offset: UInt64, needed: UInt64, fileSize: UInt64)
    /// A header field or table entry has a value the format does not allow.
    case invalid(file: String, field: String, detail: String)
    /// A valid image uses something rawmount does not implement.
    case unsupported(file: String, feature: String)
    /// Not recognised as any supported format.
    case unknownFormat(file: String)
    /// A guest request outside the virtual disk.
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// A write to an image opened read-only.
    case readOnly(file: String)
    /// Another process holds a conflicting lock on the image.
    case locked(file: String, detail: String)
    /// A request the caller got wrong (bad size string, missing file...).
    case usage(String)
    /// A flush or write-back of this image failed earlier; writes and flushes fail until the
    /// image is opened again (the host may have dropped data that was to be written).
    case earlierFailure(file: String, detail: String)
    /// A host write was about to land on the image's own metadata (a refcount or a table
    /// that lies): refused, and the image is marked corrupt and served read-only from then on.
    case metadataOverlap(file: String, detail: String)

    public var description: String { description(hintingForceShare: true) }

    /// `hintingForceShare`: a lock refusal says how a reader looks at the image anyway
    /// (-r -U); false for commands that have no such option.
    public func description(hintingForceShare: Bool) -> String {
        switch self {
        case let .io(file, op, offset, err):
            let at = offset.map { " at offset \($0)" } ?? ""
            return "\(file): \(op) failed\(at): \(String(cString: strerror(err)))"
        case let .truncated(file, what, offset, needed, size):
            return "\(file): file is truncated: \(what) needs bytes \(offset)..<\(offset &+ needed) but the file is \(size) bytes"
        case let .invalid(file, field, detail):
            return "\(file): invalid \(field): \(detail)"
        case let .unsupported(file, feature):
            return "\(file): unsupported: \(feature)"
        case let .unknownFormat(file):
            return "\(file): not a recognised disk image format"
        case let .outOfRange(offset, length, size):
            return "request \(offset)+\(length) is outside the \(size)-byte disk"
        case let .readOnly(file):
            return "\(file): image is open read-only"
        case let .locked(file, detail):
            return "\(file): image is in use: \(detail)" + (hintingForceShare ? " (to look at it anyway: -r -U, which may show a disk that changes under you)" : "")
        case let .usage(text):
            return text
        case let .metadataOverlap(file, detail):
            return "\(file): preventing a write on metadata: \(detail); the image is marked corrupt (check --repair, or qemu-img check -r all)"
        case let .earlierFailure(file, detail):
            return "\(file): an earlier write-back failed (\(detail)); writes and flushes fail until the image is mounted again"
        }
    }

    /// The file the error is about, when there is one (its description then starts with it).
    public var file: String? {
        switch self {
        case let .io(file, _, _, _), let .truncated(file, _, _, _, _), let .invalid(file, _, _),
             let .unsupported(file, _), let .unknownFormat(file), let .readOnly(file), let .locked(file, _),
             let .earlierFailure(file, _), let .metadataOverlap(file, _):
            return file
        case .outOfRange, .usage:
            return nil
        }
    }

    /// A file that was to be opened does not exist (for errors about a missing backing or
    /// extent file, reported against the image that names it).
    public var isFileNotFound: Bool {
        if case let .io(_, _, _, err) = self { return err == ENOENT }
        return false
    }

    /// The errno a FUSE reply carries for this error.
    public var errnoValue: Int32 {
        switch self {
        case let .io(_, _, _, err): return err
        case .truncated, .invalid, .earlierFailure, .metadataOverlap: return EIO
        case .unsupported: return EOPNOTSUPP
        case .unknownFormat: return EINVAL
        case .outOfRange: return ENOSPC
        case .readOnly: return EROFS
        case .locked: return EBUSY
        case .usage: return EINVAL
        }
    }
}
