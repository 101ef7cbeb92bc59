#if canImport(Glibc)
import Glibc
#endif

/// File-name arithmetic for images that name other files (backing files, VMDK extents and
/// parents): names are relative to the directory of the file that mentions them.
public enum PathName {
    /// "a/b/c.vmdk" -> "a/b"; "c.vmdk" -> ".".
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// "a/b/c.vmdk" -> "c.vmdk".
    public static func baseName(_ path: String) -> String {
        String(path.split(separator: "/", omittingEmptySubsequences: true).last ?? Substring(path))
    }

    /// `name` as seen from the file `referrer`: absolute names stay, others join its directory.
    /// A referrer without a directory leaves the name as it is (no "./"), as qemu-img
    /// combines them (its full-backing-filename).
    public static func resolve(_ name: String, relativeTo referrer: String) -> String {
        if name.hasPrefix("/") || !referrer.contains("/") { return name }
        let dir = directory(of: referrer)
        return dir == "/" ? "/" + name : dir + "/" + name
    }

    /// The names in `folder` (not "." and ".."), in no particular order.
    public static func entries(of folder: String) throws -> [String] {
        guard let d = opendir(folder) else { throw BlockError.io(file: folder, operation: "list", offset: nil, errno: errno) }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// `name` inside `folder`.
    public static func join(_ folder: String, _ name: String) -> String {
        folder.hasSuffix("/") ? folder + name : folder + "/" + name
    }
}
