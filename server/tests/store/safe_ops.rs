//! Safe-operation tables in both stores: plans applied once, approvals once
//! per approver, changes with their recycled rows, undone once, and live
//! SVIDs counted from the issuance journal.

use meshid_server::store::safe_ops::{ChangeRow, PlanApproval, PlanRow, RecycleRow};

use super::{Db, cert};

pub(super) async fn safe_ops_plans_changes_recycle(db: Db) {
    let s = db.open().await;
    let plan = PlanRow {
        id: "p1".into(),
        kind: "entry_delete".into(),
        author: "uid:0".into(),
        created_at: 10,
        expires_at: 20,
        body: "{}\n".into(),
        applied_change: String::new(),
    };
    s.insert_plan(&plan).await.expect("insert plan");
    assert!(s.insert_plan(&plan).await.is_err(), "duplicate plan id");
    assert_eq!(s.get_plan("p1").await.expect("get"), Some(plan.clone()));
    assert_eq!(s.get_plan("nope").await.expect("get"), None);

    let approval = |who: &str| PlanApproval {
        plan_id: "p1".into(),
        approver: who.into(),
        approved_at: 11,
    };
    assert!(
        s.add_plan_approval(&approval("uid:1"))
            .await
            .expect("approve")
    );
    assert!(
        !s.add_plan_approval(&approval("uid:1"))
            .await
            .expect("again")
    );
    assert!(
        s.add_plan_approval(&approval("uid:2"))
            .await
            .expect("second")
    );
    let who: Vec<String> = s
        .list_plan_approvals("p1")
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.approver)
        .collect();
    assert_eq!(who, ["uid:1", "uid:2"]);

    assert!(s.mark_plan_applied("p1", "c1").await.expect("apply"));
    assert!(!s.mark_plan_applied("p1", "c2").await.expect("applied once"));
    assert_eq!(
        s.get_plan("p1")
            .await
            .expect("get")
            .expect("plan")
            .applied_change,
        "c1"
    );

    let change = |id: &str, at: i64| ChangeRow {
        id: id.into(),
        kind: "entry_delete".into(),
        actor: "uid:0".into(),
        created_at: at,
        counts: r#"{"entries":2}"#.into(),
        undo_until: at + 100,
        undone_at: 0,
    };
    let recycled = |change: &str, id: &str| RecycleRow {
        change_id: change.into(),
        item_kind: "entry".into(),
        item_id: id.into(),
        data: vec![1, 2, 3, 0, 255],
        expires_at: 200,
    };
    s.record_change(
        &change("c1", 12),
        &[recycled("c1", "e1"), recycled("c1", "e2")],
    )
    .await
    .expect("record");
    s.record_change(&change("c2", 13), &[])
        .await
        .expect("record 2");
    // A change whose recycled rows fail to insert is not recorded at all.
    assert!(
        s.record_change(
            &change("c3", 14),
            &[recycled("c3", "x"), recycled("c3", "x")]
        )
        .await
        .is_err()
    );
    assert_eq!(s.get_change("c3").await.expect("get"), None);
    // Within one second, the later change is listed first ("a" < "c2").
    s.record_change(&change("a", 13), &[])
        .await
        .expect("record a");
    let listed: Vec<String> = s
        .list_changes(10)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, ["a", "c2", "c1"], "newest first");
    assert_eq!(s.list_changes(1).await.expect("limit").len(), 1);
    let rows = s.list_recycled("c1").await.expect("recycled");
    assert_eq!(rows, [recycled("c1", "e1"), recycled("c1", "e2")]);
    // Kept until their undo window ends (expires_at 200), then purged.
    assert_eq!(s.purge_recycled(200).await.expect("purge"), 0);
    assert_eq!(s.purge_recycled(201).await.expect("purge"), 2);
    assert!(s.list_recycled("c1").await.expect("recycled").is_empty());
    assert!(s.mark_change_undone("c1", 50).await.expect("undo"));
    assert!(!s.mark_change_undone("c1", 51).await.expect("undone once"));
    assert_eq!(
        s.get_change("c1")
            .await
            .expect("get")
            .expect("change")
            .undone_at,
        50
    );

    // Live: (A, e1) 01 renewed by 02; (B, e2) 03 expired; (A, "") agent SVID.
    s.record_issued(&[
        cert("01", "A", "e1", "c", 100),
        cert("02", "A", "e1", "c", 100),
        cert("03", "B", "e2", "c", 5),
        cert("04", "A", "", "c", 100),
    ])
    .await
    .expect("issued");
    let live = |e: &[&str], a: &[&str]| {
        let e: Vec<String> = e.iter().map(|s| s.to_string()).collect();
        let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        let s = s.clone();
        async move { s.count_live_issued(&e, &a, 10).await.expect("count") }
    };
    assert_eq!(live(&["e1"], &[]).await, 1);
    assert_eq!(live(&["e2"], &[]).await, 0);
    assert_eq!(live(&[], &["A"]).await, 2);
    assert_eq!(live(&["e1"], &["A"]).await, 2);
    assert_eq!(live(&[], &[]).await, 0);
}
