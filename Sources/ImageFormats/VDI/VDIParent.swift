import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Where the parent of a VirtualBox differencing image is. VirtualBox links them in its
/// media registry, not by file name; on disk the child names only its parent's UUID. A VM
/// keeps its base disk in the VM folder and snapshot images in its Snapshots folder, so the
/// child's own folder and the one above it are searched for a .vdi with that UUID.
enum VDIParent {
    static let maxCandidates = 4096

    /// A parent is taken only if it is the one file with that UUID in the two folders (two
    /// candidates are refused, naming both: a copy planted next to the real parent must not
    /// win by its name) and belongs to the child's owner or to root.
    static func find(for child: String, header: VDIHeader) throws -> String {
        let dir = child.contains("/") ? PathName.directory(of: child) : ""
        let up = dir.isEmpty || !dir.contains("/") ? "" : PathName.directory(of: dir)
        var owner = stat()
        guard stat(child, &owner) == 0 else { throw BlockError.io(file: child, operation: "stat", offset: nil, errno: errno) }
        var looked = 0
        var found: [(path: String, id: FileIdentity?)] = []
        var foreign: [String] = []
        for folder in [dir.isEmpty ? "." : dir, up.isEmpty ? "." : up] {
            let names = (try? PathName.entries(of: folder)) ?? []
            for name in names.sorted() where name.lowercased().hasSuffix(".vdi") {
                let path = PathName.join(folder, name)
                guard path != child, looked < maxCandidates else { continue }
                looked += 1
                guard let f = try? ImageFile(path: path, writable: false) else { continue }
                guard let raw = try? f.readBytes(count: 512, at: 0, what: "VDI header"), VDIHeader.probe(raw),
                      VDIHeader(raw: raw).uuidImage == header.uuidLink else { continue }
                var st = stat()
                guard fstat(f.fd, &st) == 0 else { continue }
                guard st.st_uid == owner.st_uid || st.st_uid == 0 else { foreign.append(path); continue }
                // The same file reached twice (the folder above is the folder itself, a hard link) is one candidate.
                if let id = f.identity, found.contains(where: { $0.id == id }) { continue }
                found.append((path, f.identity))
            }
        }
        if found.count > 1 {
            throw BlockError.invalid(file: child, field: "parent image",
                                     detail: "\(found.count) files carry its parent's UUID \(VDIHeader.uuidText(header.uuidLink)) "
                                        + "(\(found.map(\.path).joined(separator: ", "))); refusing to guess which one is the parent")
        }
        if let only = found.first { return only.path }
        let skipped = foreign.isEmpty ? "" : " (\(foreign.joined(separator: ", ")) has that UUID but belongs to another user; refused)"
        throw BlockError.invalid(file: child, field: "parent image",
                                 detail: "this VirtualBox differencing image needs its parent \(VDIHeader.uuidText(header.uuidLink)), "
                                    + "and no .vdi with that UUID is in \(dir.isEmpty ? "." : dir) or the folder above it" + skipped)
    }
}
