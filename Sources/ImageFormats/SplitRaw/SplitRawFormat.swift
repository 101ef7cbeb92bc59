import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

extension ImageFormat { public static let splitraw = ImageFormat(name: "splitraw") }

/// Split raw in the format registry. Raw bytes say nothing about it, so it is found by name
/// (`SplitRawFormat.detect`): a first piece (image.001, image.aa) whose second piece exists;
/// found that way it is evidence and served read-only. `--format splitraw` opens it
/// writable, as asked.
enum SplitRawFormat: FormatOpening {
    static let format = ImageFormat.splitraw
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { false }

    /// Whether `path`, which probes as raw, is the first piece of a split set: a later piece
    /// exists (the second, or one of the next few when the second is missing, which the
    /// open then reports rather than showing the first piece alone as the disk).
    static func detect(_ path: String) -> Bool {
        guard let name = SplitRawNames.scheme(of: path) else { return false }
        return (1...lookahead).contains { k in name(k).map { access($0, F_OK) == 0 } ?? false }
    }

    /// How far past a missing piece a later one is looked for.
    static let lookahead = 8

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let detected = r.options.format == nil
        guard let name = SplitRawNames.scheme(of: r.path) else {
            throw BlockError.usage("\(r.path): not the first piece of split raw evidence (image.000, image.001 or image.aa)")
        }
        var pieces = [r.file], names = [r.path]
        var index = 1
        // (Existence only says where the set ends; each piece is opened once, as the policy says.)
        while let next = name(index), access(next, F_OK) == 0 {
            guard pieces.count < SplitRawNames.maxPieces else {
                throw BlockError.invalid(file: r.path, field: "split raw pieces", detail: "more than \(SplitRawNames.maxPieces)")
            }
            let piece = try ReferencedFiles.openPart(next, of: r.path, writable: r.writable, shared: !r.options.lock)
            if r.options.lock { try ImageLock.acquire(piece, writable: piece.isWritable) }
            pieces.append(piece); names.append(next)
            index += 1
        }
        // A missing piece in the middle would shift every byte after it.
        for k in index + 1 ... index + lookahead {
            if let later = name(k), access(later, F_OK) == 0 {
                throw BlockError.invalid(file: name(index) ?? r.path, field: "split raw pieces",
                                         detail: "this piece is missing, but \(PathName.baseName(later).escapingControls) exists")
            }
        }
        return BlockDevice(driver: try SplitRawDriver(pieces: pieces, names: names, detected: detected))
    }
}
